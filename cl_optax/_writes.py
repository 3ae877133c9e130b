r"""Boundary writes: a parameter change decided at ``consolidate``, emitted as the next update.

A task boundary sometimes has to *set* parameters: PackNet zeroes the weights
it prunes, shrink-and-perturb sets :math:`\theta \leftarrow \lambda\theta +
\sigma\theta_{\text{fresh}}`, O-LoRA writes an adapter into its slot, a head
is re-aligned. The optax way to change parameters is an update, so the write
is kept in the optimiser state (jittable, sharded like the parameters,
checkpointed with the rest) and emitted by the next ``update``:

.. math::
  u_i \leftarrow \begin{cases} t_i - \theta_i & \text{written entries} \\
  u_i & \text{otherwise} \end{cases}

then cleared. ``optax.apply_updates`` gives :math:`\theta_i + (t_i - \theta_i)`:
exactly :math:`t_i = 0` for a write of zero (:math:`\theta + (-\theta) = 0` in
floating point), :math:`t_i` up to one rounding of :math:`t_i - \theta_i`
otherwise.

This module is the one home of the mechanism:

- the pieces a method's own state embeds (:class:`PendingWrite`,
  :func:`init_pending`, :func:`schedule` at ``consolidate``, :func:`emit` in
  ``update``, :func:`write_leaf` for one leaf);
- the standalone transform :func:`boundary_writes`;
- :func:`apply_pending_writes`, which applies and clears every pending write of
  an optimiser state at once (for a user who evaluates before the next step).

See ``docs/boundary_writes_and_resets.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _trees

_TRANSFORM = "boundary_writes"


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


def _is_pending(x: Any) -> bool:
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
  ``consolidate`` validates its signal first (see :func:`boundary_writes`).
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


def apply_pending_writes(
  params: optax.Params, opt_state: optax.OptState
) -> tuple[optax.Params, optax.OptState]:
  """Applies every pending boundary write of ``opt_state`` to ``params`` now, and clears them.

  For a user who evaluates between ``consolidate`` and the next step: the
  returned parameters are those the next ``update`` + ``optax.apply_updates``
  would give on the written entries (bitwise: the same ``p + (t - p)``),
  unchanged elsewhere, and the returned state has nothing pending, so the
  next step is an ordinary one. Walks any optax state tree the way
  :func:`cl_optax.consolidate` does (chain, masked, partition, MultiSteps,
  inject_hyperparams, apply_if_finite, an ``nnx.Optimizer``, whose variables
  are set in place) and applies each :class:`PendingWrite` it finds, in tree
  order. Jittable.

  Args:
    params: the parameters the optimiser was initialised with (their current
      values); NNX ``Variable`` leaves are read.
    opt_state: an optax state, or an ``nnx.Optimizer`` / its ``opt_state``.

  Returns:
    ``(params, opt_state)``: plain-array parameters (for NNX, write them back
    with ``nnx.update(model, params)``) and the state with no pending write.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx = optax.chain(optax.adam(1e-3), cl_optax.boundary_writes())
    >>> state = cl_optax.consolidate(
    ...     tx.init(params), params, writes=0.0,
    ...     write_mask={"w": jnp.array([True, False, True])})
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> params["w"]
    Array([0., 2., 0.], dtype=float32)
  """
  opt_state = _trees.optimizer_state(opt_state)
  box = [_trees.unwrap_variables(params)]

  def apply(pending):
    box[0], cleared = apply_now(pending, box[0])
    return cleared

  new_state = _trees.map_nodes(opt_state, _is_pending, apply)
  return box[0], new_state


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


class BoundaryWritesState(NamedTuple):
  """State of :func:`boundary_writes`.

  Attributes:
    pending: the scheduled write (:class:`PendingWrite`), emitted and cleared
      by the next ``update``.
  """

  pending: PendingWrite

  def consolidate(self, params, **signals) -> BoundaryWritesState:
    """Schedules ``writes=`` (targets) on the entries of ``write_mask=`` (default: all).

    ``writes=None`` schedules nothing; a missing ``writes=`` is an error (a
    misspelt signal would otherwise write nothing without a word).
    """
    del params
    got = validated_writes(signals, self.pending.write_target, transform=_TRANSFORM)
    if got is None:
      return self
    return self._replace(pending=schedule(self.pending, *got))


def boundary_writes() -> optax.GradientTransformationExtraArgs:
  r"""Parameter writes decided at a task boundary, landing exactly on the next step.

  At :func:`cl_optax.consolidate` with ``writes=`` (target values) and
  ``write_mask=`` (which entries), the write is stored; the next ``update``
  replaces the incoming update of every written entry by
  :math:`t - \theta` and passes the others through, then clears the write:

  .. math::
    u \leftarrow M \odot (t - \theta) + (1 - M) \odot u

  so ``optax.apply_updates`` lands written entries on :math:`t` — exactly for
  :math:`t = 0` (PackNet's pruned weights), up to one rounding of
  :math:`t - \theta` otherwise — and gives the others their ordinary step.

  **Put it last in the chain** (``optax.chain(optax.adam(lr),
  cl_optax.boundary_writes())``): any transform after it rescales
  :math:`t - \theta` (``sgd(lr)`` would move the entries only ``lr`` of the
  way, Adam would normalise the step away). The state cannot show it (a
  stateless ``optax.scale`` leaves no trace), so check a chain once with
  :func:`cl_optax.check_writes_last`, which runs one armed update.
  ``optax.MultiSteps``: the write lands at the next real step (mini-steps
  do not call the inner transform). ``optax.apply_if_finite``: a skipped
  step keeps the inner state, so the write stays pending until a finite step
  applies it; a non-finite update entry passes unchanged, also where written.
  To apply the write at once (evaluation right after the boundary), use
  :func:`cl_optax.apply_pending_writes`.

  Signals (``consolidate``):
    writes: target values: a pytree like params, leaves broadcastable to the
      parameters, or one number for every written entry; ``None`` writes
      nothing at this boundary. Required (the message names it if missing).
    write_mask: ``bool`` pytree like params (leaves broadcastable, e.g. one
      bool per leaf or a ``[1, n]`` column mask) or one bool; default
      ``True``. Two boundaries before a step merge: the later target wins on
      entries both write.

  Memory: a params-dtype target and a ``bool`` per parameter entry (see
  :class:`PendingWrite`); ``optax.masked(boundary_writes(), labels)`` keeps
  them only for the labelled leaves. A step with nothing pending costs one
  scalar test.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Mallya & Lazebnik, *PackNet*, CVPR 2018 (prune: pruned weights set to 0);
    Ash & Adams, *On warm-starting neural network training*, NeurIPS 2020
    (shrink and perturb, :math:`\theta \leftarrow 0.4\theta + 0.1\theta'`).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx = optax.chain(optax.sgd(0.1), cl_optax.boundary_writes())
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(
    ...     state, params, writes=0.0, write_mask={"w": jnp.array([False, True, False])})
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.9, 0. , 2.9], dtype=float32)
  """

  def init_fn(params):
    return BoundaryWritesState(pending=init_pending(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    updates, pending = emit(updates, state.pending, params, transform=_TRANSFORM)
    return updates, BoundaryWritesState(pending=pending)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_writes_last(tx: optax.GradientTransformation, params: optax.Params, **extra_args) -> None:
  """Raises a ``ValueError`` when a transform after a boundary write rescales it.

  A debugging check for a chain (run it once, outside ``jit``): it arms every
  :class:`PendingWrite` of a fresh ``tx.init(params)`` with the write
  ``t = params + 1`` on every entry, runs one ``tx.update`` on zero gradients
  (``extra_args`` are passed on, e.g. ``ref_grads=`` for ``agem``) and checks
  that the updates are ``t - params`` (about 1). A transform after the write
  (``sgd``'s ``-lr``, Adam's normalisation, a clip) changes them; the message
  names the leaves and the factor seen. Under ``optax.MultiSteps`` check the
  inner transform (the first call is a mini-step).

  Raises:
    ValueError: if ``tx`` holds no pending-write state, or its update does not
      deliver the writes unchanged.
  """
  plain = _trees.unwrap_variables(params)
  state = tx.init(params)
  armed = []

  def arm(pending):
    full = _trees.restrict_like(
      pending.write_target, plain, transform="check_writes_last", name="params"
    )
    target = _trees.map_unmasked(lambda t, p: (p + 1).astype(t.dtype), pending.write_target, full)
    armed.append(target)
    mask = _trees.map_unmasked(lambda m: jnp.ones_like(m), pending.write_mask)
    return PendingWrite(target, mask, jnp.ones((), jnp.bool_))

  state = _trees.map_nodes(state, _is_pending, arm)
  if not armed:
    raise ValueError("check_writes_last: `tx` holds no boundary-write state (boundary_writes()).")
  zeros = jax.tree.map(jnp.zeros_like, plain)
  updates, _ = tx.update(zeros, state, params, **extra_args)
  bad = []
  paths = _trees.key_strings(armed[-1])
  for path, t, p, u in zip(
    paths,
    jax.tree.leaves(armed[-1], is_leaf=_trees.is_masked),
    jax.tree.leaves(plain, is_leaf=_trees.is_masked),
    jax.tree.leaves(updates, is_leaf=_trees.is_masked),
    strict=True,
  ):
    if _trees.is_masked(t) or _trees.is_masked(u) or np.size(u) == 0:
      continue
    want = np.asarray(jnp.asarray(t, jnp.float32) - jnp.asarray(p, jnp.float32))
    got = np.asarray(jnp.asarray(u, jnp.float32))
    if not np.allclose(got, want, rtol=1e-2, atol=1e-6):
      ratio = float(np.median(got / np.where(want == 0, 1, want)))
      bad.append(f"{path} (updates = {ratio:.3g} x the write)")
  if bad:
    raise ValueError(
      "check_writes_last: a transform after the boundary write changes it, so written entries "
      f"would miss their targets: {bad}. Put boundary_writes() (or the method that embeds a "
      "write) last in the chain, after the learning rate and any adaptive optimiser."
    )
