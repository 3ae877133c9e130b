r"""Boundary-write pieces: what a method's own state embeds to schedule and emit a write.

A write decided at ``consolidate`` is kept in the optimiser state as a
:class:`PendingWrite` and emitted by the next ``update`` as
:math:`t_i - \theta_i` on the written entries (see :mod:`cl_optax._writes`
for the rule and the standalone transform):

- :class:`PendingWrite`, :func:`init_pending`: the sub-state and its empty
  value laid out like the parameters;
- :func:`validated_writes` and :func:`schedule` at ``consolidate``;
- :func:`emit` in ``update`` (last), :func:`write_leaf` for one leaf (also
  used by :func:`cl_optax.unit_resets`);
- :func:`apply_now`, :func:`apply_leaf`: the write applied at once;
- :func:`broadcast_like`, :func:`replicated`: layout helpers under explicit
  sharding.

:mod:`cl_optax._writes` re-exports every piece; see
``docs/boundary_writes_and_resets.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _trees


class PendingWrite(NamedTuple):
  """A scheduled parameter write, embedded in a method's state.

  Memory: one params-dtype target and one ``bool`` per written-to parameter
  entry (1.25x the parameters for float32), whether or not a write is
  pending; wrap the transform in ``optax.masked`` to keep it only on the
  leaves that can be written.

  Attributes:
    write_target: pytree like params (params' dtypes): the values written
      entries take; stale where ``write_mask`` is ``False``.
    write_mask: ``bool`` pytree like params: the entries to write.
    write_pending: ``bool`` scalar, whether any entry is to be written (the
      next ``update`` skips all work when it is ``False``).
  """

  write_target: Any
  write_mask: Any
  write_pending: jax.Array  # shape=(), bool


def is_pending(x: Any) -> bool:
  """Whether ``x`` is a :class:`PendingWrite` (a node of an optimiser state)."""
  return isinstance(x, PendingWrite)


def init_pending(params: optax.Params) -> PendingWrite:
  """An empty :class:`PendingWrite` laid out like ``params`` (``MaskedNode`` leaves stay)."""
  return PendingWrite(
    write_target=_trees.map_unmasked(jnp.zeros_like, params),
    write_mask=_trees.map_unmasked(lambda p: jnp.zeros_like(p, dtype=jnp.bool_), params),
    write_pending=jnp.zeros((), jnp.bool_),
  )


def schedule(pending: PendingWrite, targets: Any, mask: Any = True) -> PendingWrite:
  """Adds a write to ``pending``: entries where ``mask`` holds take ``targets``.

  ``targets`` and ``mask`` are pytrees with the params' structure (leaves
  broadcastable to the parameters; ``MaskedNode`` where ``pending`` has one),
  or a single value / bool for every leaf. A later write overrides an earlier
  one on the entries both write; the masks are OR-ed. No checks: a state's
  ``consolidate`` validates its signal first (see :func:`validated_writes`).
  """
  tmpl = pending.write_target
  targets = _broadcast_tree(targets, tmpl)
  mask = _broadcast_tree(mask, tmpl)

  def target(t, v, m):  # signals placed like the state first (they may come sharded otherwise)
    v = _trees.placed_like(t, jnp.broadcast_to(jnp.asarray(v, t.dtype), t.shape))
    m = _trees.placed_like(t, jnp.broadcast_to(jnp.asarray(m, jnp.bool_), t.shape))
    return jnp.where(m, v, t)

  def new_mask(old, m):
    return old | _trees.placed_like(old, jnp.broadcast_to(jnp.asarray(m, jnp.bool_), old.shape))

  any_new = [jnp.any(jnp.asarray(m, jnp.bool_)) for m in _trees.unmasked_leaves(mask)]
  return PendingWrite(
    write_target=_trees.map_unmasked(target, tmpl, targets, mask),
    write_mask=_trees.map_unmasked(new_mask, pending.write_mask, mask),
    write_pending=jnp.logical_or(pending.write_pending, jnp.any(jnp.stack(any_new)))
    if any_new
    else pending.write_pending,
  )


def _typed_spec(x: Any) -> Any:
  """The sharding spec in ``x``'s type (explicit sharding), or None when it has none."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec if spec is not None and any(s is not None for s in spec) else None


def broadcast_like(x: Any, ref: Any) -> jax.Array:
  """``x`` broadcast to ``ref``'s shape and, under explicit sharding, laid out like ``ref``.

  Under an ``Explicit`` mesh a ``[1, n]`` unit mask broadcast to a sharded
  kernel would be replicated and clash with it; resharding a replicated
  array to ``ref``'s layout only slices it (no communication). A no-op in
  the usual ``Auto`` mode and on one device.
  """
  x = jnp.broadcast_to(x, jnp.shape(ref))
  spec = _typed_spec(ref)
  if spec is None or _typed_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, jax.typeof(ref).sharding)


def replicated(x: Any) -> jax.Array:
  """``x`` replicated when its type carries an explicit sharding (small per-unit vectors)."""
  if _typed_spec(x) is None:
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def write_leaf(u: Any, target: Any, mask: Any, p: Any) -> Any:
  """One leaf of a write: ``target - p`` where ``mask`` holds, ``u`` elsewhere.

  ``target`` and ``mask`` broadcast to ``p``'s shape. The difference is taken
  in the type of ``target`` and ``p`` and cast to ``u``'s dtype (exact when
  the updates have the params' dtype, the usual case). Non-finite entries of
  ``u`` pass unchanged, also where written, so ``optax.apply_if_finite`` (and
  a user's own check) still sees them.
  """
  if _trees.is_masked(u) or u is None:
    return u
  dt = jnp.result_type(target, p)
  w = (broadcast_like(jnp.asarray(target, dt), u) - jnp.asarray(p, dt)).astype(u.dtype)
  return jnp.where(broadcast_like(jnp.asarray(mask, jnp.bool_), u) & jnp.isfinite(u), w, u)


def _cleared(pending: PendingWrite) -> PendingWrite:
  return pending._replace(
    write_mask=_trees.map_unmasked(jnp.zeros_like, pending.write_mask),
    write_pending=jnp.zeros((), jnp.bool_),
  )


def emit(
  updates: optax.Updates, pending: PendingWrite, params: optax.Params | None, *, transform: str
) -> tuple[optax.Updates, PendingWrite]:
  """In ``update``: the updates with the pending write in place, and the cleared write.

  Written entries get ``target - params`` in place of their update (see
  :func:`write_leaf`); the others pass through unchanged. When nothing is
  pending (``write_pending`` is ``False``) a ``lax.cond`` skips the pass over
  the parameters. Call it last in a method's ``update``, on the final
  updates.

  Raises:
    ValueError: if ``params`` is None or the updates do not match the state.
  """
  if params is None:
    raise ValueError(
      f"{transform}: update needs `params` (a pending write lands as target - params)."
    )
  _checks.check_updates(updates, pending.write_target, transform=transform)

  def write(operand):
    u, pw = operand
    new = jax.tree.map(
      write_leaf, u, pw.write_target, pw.write_mask, params, is_leaf=_trees.is_masked
    )
    return new, _cleared(pw)

  return jax.lax.cond(pending.write_pending, write, lambda operand: operand, (updates, pending))


def apply_leaf(p: Any, target: Any, mask: Any) -> Any:
  """``p + (target - p)`` where ``mask`` holds (what the next step gives), ``p`` elsewhere."""
  if _trees.is_masked(target) or p is None:
    return p
  u = jnp.asarray(target, p.dtype) - p
  return jnp.where(mask, jnp.asarray(p + u).astype(p.dtype), p)


def apply_now(pending: PendingWrite, params: optax.Params) -> tuple[optax.Params, PendingWrite]:
  """Applies ``pending`` to ``params`` at once; returns the new params and the cleared write."""
  new = jax.tree.map(
    lambda t, m, p: apply_leaf(p, t, m),
    pending.write_target,
    pending.write_mask,
    params,
    is_leaf=_trees.is_masked,
  )
  return new, _cleared(pending)


def _is_single(x: Any, template: Any) -> bool:
  """Whether ``x`` is one value for every leaf (a leaf, where ``template`` is a tree)."""
  return jax.tree.structure(x) == jax.tree.structure(0) and jax.tree.structure(
    template, is_leaf=_trees.is_masked
  ) != jax.tree.structure(0)


def _broadcast_tree(x: Any, template: Any) -> Any:
  if _is_single(x, template):
    return jax.tree.map(
      lambda t: t if _trees.is_masked(t) else x, template, is_leaf=_trees.is_masked
    )
  return x


def _check_leaves(tree: Any, *, transform: str, name: str, want_bool: bool) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_trees.is_masked):
    if _trees.is_masked(x):
      continue
    where = f"{transform}: `{name}` leaf {_trees.key_string(path)}"
    dtype = jnp.result_type(x)
    if want_bool and dtype != jnp.bool_:
      raise ValueError(f"{where} has dtype {dtype}; expected bool (True = write this entry).")
    if not want_bool and _checks.is_concrete(x) and np.size(x):
      if not bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))):
        raise ValueError(f"{where} holds non-finite values; expected finite target values.")


def validated_writes(
  signals: dict, template: Any, *, transform: str, required: bool = True
) -> tuple[Any, Any] | None:
  """The ``writes=`` / ``write_mask=`` signals, checked and laid out like ``template``.

  ``writes``: target values, a pytree like params (leaves broadcastable to the
  parameters) or one number for every written entry; ``write_mask``: ``bool``
  pytree like params (leaves broadcastable) or one bool; default ``True``
  (every entry of every leaf). Returns ``None`` when ``writes=None`` was
  passed explicitly (a boundary with nothing to write).

  Raises:
    ValueError: ``writes=`` missing (when ``required``), a tree that does not
      match the parameters, a shape that does not broadcast, a non-finite
      target or a non-bool mask; the message names the transform, the signal
      and the leaf.
  """
  if "writes" not in signals:
    if not required:
      return None
    _checks.require_signal(
      signals,
      "writes",
      transform,
      "target values, a pytree like params or one number, with `write_mask=`; "
      "pass writes=None for a boundary with nothing to write",
    )
  if signals["writes"] is None:
    return None
  what = "a pytree like params"
  got = {
    "writes": _broadcast_tree(signals["writes"], template),
    "write_mask": _broadcast_tree(signals.get("write_mask", True), template),
  }
  targets = _checks.validated_signal(
    got, "writes", template, transform=transform, broadcastable=True, what=what
  )
  mask = _checks.validated_signal(
    got, "write_mask", template, transform=transform, broadcastable=True, what=what
  )
  _check_leaves(targets, transform=transform, name="writes", want_bool=False)
  _check_leaves(mask, transform=transform, name="write_mask", want_bool=True)
  return targets, mask
