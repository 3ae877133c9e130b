r"""PackNet (Mallya & Lazebnik, CVPR 2018): :func:`packnet` and its helpers.

An integer owner map per pruned kernel, the current task's entries trained,
the rest frozen; at a boundary a prune (written to exactly 0.0 through the
boundary writes of :mod:`cl_optax._write_pieces`) and a freeze.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _select, _trees, _writes

_TRANSFORM = "packnet"
_KERNELS = ("*/kernel", "*/weight", "kernel", "weight")


def _roles(tree: Any, layers: Any, heads: Any) -> Any:
  """A tree like ``tree``: ``"prune"`` (owner map), ``"head"`` (untouched) or ``"shared"``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_trees.is_masked)

  def role(path, x):
    p = _trees.leaf_path(path)
    if heads is not None and _select.matches(heads, p, x):
      return "head"
    if _select.matches(layers, p, x) and (_trees.is_masked(x) or np.ndim(x) >= 2):
      return "prune"
    return "shared"

  return treedef.unflatten([role(p, x) for p, x in flat])


class PackNetState(NamedTuple):
  """State of :func:`packnet`.

  Attributes:
    packnet_owner: integer owner map (``owner_dtype``) for each pruned kernel,
      ``MaskedNode`` for the other leaves: 0 = free (pruned), ``t`` = owned by
      task ``t`` (1-based).
    packnet_task: int32 scalar, the task being trained (1-based).
    packnet_write: the pending prune write (a :class:`cl_optax.PendingWrite`
      over every leaf), emitted and cleared by the next ``update``.
  """

  packnet_owner: Any
  packnet_task: jax.Array  # shape=(), int32
  packnet_write: _writes.PendingWrite

  def consolidate(self, params: optax.Params, **signals: Any) -> PackNetState:
    """``prune=p``: prune a fraction ``p`` of the task's weights; ``finish=True``: next task."""
    if signals.get("prune") is None and not signals.get("finish"):
      _checks.require_signal(
        signals, "prune", _TRANSFORM,
        "the fraction in [0, 1] of the task's weights to prune; or finish=True to end the task",
      )  # fmt: skip
    state = self
    if signals.get("prune") is not None:
      state = state._pruned(params, signals["prune"])
    if signals.get("finish"):
      state = state._finished()
    return state

  def _pruned(self, params: Any, prune: Any) -> PackNetState:
    _checks.check_hyperparameter(prune, transform=_TRANSFORM, name="prune", low=0.0, high=1.0)
    if np.ndim(prune) != 0:
      raise ValueError(f"{_TRANSFORM}: `prune` must be one number in [0, 1]; got {prune!r}.")
    params = _trees.restrict_like(
      self.packnet_owner, _trees.unwrap_variables(params), transform=_TRANSFORM, name="params"
    )
    _checks.check_shapes(self.packnet_owner, params, transform=_TRANSFORM, name="params")
    pruned = _trees.map_unmasked(
      lambda o, w: _prune_mask(o == self.packnet_task, w, prune), self.packnet_owner, params
    )
    owner = _trees.map_unmasked(
      lambda o, m: _trees.placed_like(o, jnp.where(m, jnp.zeros((), o.dtype), o)),
      self.packnet_owner,
      pruned,
    )
    mask = jax.tree.map(
      lambda m, t: m if not _trees.is_masked(m) else False,
      pruned,
      self.packnet_write.write_mask,
      is_leaf=_trees.is_masked,
    )
    write = _writes.schedule(self.packnet_write, 0.0, mask)
    return self._replace(packnet_owner=owner, packnet_write=write)

  def _finished(self) -> PackNetState:
    task = self.packnet_task + 1
    for o in _trees.unmasked_leaves(self.packnet_owner):
      top = np.iinfo(o.dtype).max
      if _checks.is_concrete(task) and int(task) > top:
        raise ValueError(f"{_TRANSFORM}: task {int(task)} does not fit the owner dtype {o.dtype}.")
    owner = _trees.map_unmasked(
      lambda o: _trees.placed_like(o, jnp.where(o == 0, task.astype(o.dtype), o)),
      self.packnet_owner,
    )
    return self._replace(packnet_owner=owner, packnet_task=task)


def _prune_mask(current: jax.Array, w: jax.Array, fraction: Any) -> jax.Array:
  """The current task's entries at or below the k-th smallest |w| among them, k = round(p n)."""
  mag = jnp.abs(jnp.asarray(w, jnp.float32))
  n = jnp.sum(current)
  k = jnp.round(jnp.asarray(fraction, jnp.float32) * n).astype(jnp.int32)
  ranked = jnp.sort(_writes.replicated(jnp.where(current, mag, jnp.inf)).ravel())  # a boundary
  cutoff = jnp.take(ranked, jnp.clip(k - 1, 0, max(ranked.size - 1, 0)))
  return current & (mag <= cutoff) & (k > 0)


def packnet(
  *,
  layers: Any = _KERNELS,
  heads: Any = None,
  train_biases: bool = False,
  owner_dtype: Any = jnp.int8,
) -> optax.GradientTransformationExtraArgs:
  r"""PackNet (Mallya & Lazebnik, CVPR 2018): one network, each weight owned by one task.

  Each pruned kernel (``layers``) has an integer owner map, 0 = free, ``t`` =
  owned by task ``t`` (1-based); at the start everything belongs to task 1.
  In ``update``

  .. math::
    u \leftarrow u \odot [\text{owner} = t]

  on the pruned kernels, and the other leaves (biases, norms) get a zero
  update from task 2 on (``train_biases=False``, the official ``nobias-nobn``
  runs); ``heads`` are left alone. **Put it last, after the optimiser**:
  then momentum and Adam cannot move a frozen or pruned entry (their update
  is exactly zero), which the official code gets by rebuilding SGD and
  re-zeroing after each step.

  :func:`cl_optax.consolidate` in two phases per task:

  - ``prune=p`` (after training): per layer, among the current task's
    entries, the :math:`k = \mathrm{round}(p\,n)` smallest :math:`|w|` and
    every entry tied with the :math:`k`-th are freed (owner 0) and written to
    exactly 0.0 by the next ``update`` (a boundary write; apply it at once
    with :func:`cl_optax.apply_pending_writes` to evaluate before the next
    step). Then retrain the kept entries (the freed ones stay 0).
    :math:`p` is 0.75 in the official runs, or :func:`packnet_share` (the
    equal-share rule :math:`1 - 1/(T - t)`).
  - ``finish=True`` (after retraining): the task's entries are frozen, the
    free ones go to the next task (they restart from 0, as in the code).

  Evaluate task :math:`d` with :func:`packnet_params`,
  :math:`\theta \odot [0 < \text{owner} \le d]`, which leaves the live
  parameters alone (the official ``apply_mask`` zeroes them in place).

  Args:
    layers: selector of the pruned kernels (leaves of 2 or more axes; default
      every ``kernel`` / ``weight``). Static under ``optax.inject_hyperparams``
      (as are the other arguments).
    heads: selector of leaves left untouched (per-task heads).
    train_biases: keep training the other leaves after task 1.
    owner_dtype: ``jnp.int8`` (up to 127 tasks) or ``jnp.int16``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Mallya & Lazebnik, *PackNet: Adding multiple tasks to a single network by
    iterative pruning*, CVPR 2018 (arXiv:1711.05769), Sec. 3; official code
    ``arunmallya/packnet`` (``src/prune.py`` ``prune``, ``make_grads_zero``,
    ``apply_mask``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"l": {"kernel": jnp.array([[0.1, -2.0], [3.0, 0.2]])}}
    >>> tx = optax.chain(optax.sgd(1.0), cl_optax.packnet())
    >>> state = cl_optax.consolidate(tx.init(params), params, prune=0.5)
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> params["l"]["kernel"]
    Array([[ 0., -2.],
           [ 3.,  0.]], dtype=float32)
  """
  if jnp.dtype(owner_dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.int16)):
    raise ValueError(f"{_TRANSFORM}: `owner_dtype` must be int8 or int16; got {owner_dtype!r}.")

  def init_fn(params: optax.Params) -> PackNetState:
    plain = _trees.unwrap_variables(params)
    roles = _roles(plain, layers, heads)
    owner = jax.tree.map(
      lambda r, p: jnp.ones_like(p, owner_dtype) if r == "prune" and not _trees.is_masked(p)
      else optax.MaskedNode(),
      roles, plain, is_leaf=_trees.is_masked,
    )  # fmt: skip
    return PackNetState(owner, jnp.ones((), jnp.int32), _writes.init_pending(plain))

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args(_TRANSFORM, extra_args)
    state = cast(PackNetState, state)
    roles = _roles(updates, layers, heads)
    _checks.check_updates(updates, state.packnet_write.write_target, transform=_TRANSFORM)
    shared_keep = jnp.logical_or(state.packnet_task == 1, train_biases)

    def leaf(r, o, u):
      if _trees.is_masked(u) or u is None or r == "head":
        return u
      return _trees.mask_leaf(u, o == state.packnet_task if r == "prune" else shared_keep)

    updates = jax.tree.map(leaf, roles, state.packnet_owner, updates, is_leaf=_trees.is_masked)
    updates, write = _emit_fused(updates, state.packnet_write, params)
    return updates, state._replace(packnet_write=write)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _emit_fused(updates: Any, pending: _writes.PendingWrite, params: Any) -> tuple[Any, Any]:
  """:func:`cl_optax._writes.emit` without its ``lax.cond``: the write's mask fused into the step.

  A ``cond`` over params-sized operands keeps XLA from fusing the owner mask
  into Adam's last loop (74 against 45 compiled bytes per parameter on
  ``mlp-1000``); here each written entry is ``write_leaf``'s ``target - p``
  where ``mask & pending`` holds (PackNet only writes 0.0, so the stored
  target is not read), and the mask is cleared every step.
  """
  if params is None:
    raise ValueError(f"{_TRANSFORM}: update needs `params` (a pending write lands as -params).")
  _checks.check_updates(updates, pending.write_target, transform=_TRANSFORM)
  on = pending.write_pending
  new = jax.tree.map(
    lambda u, m, p: u if _trees.is_masked(m) else _writes.write_leaf(u, 0.0, m & on, p),
    updates, pending.write_mask, _trees.unwrap_variables(params),
    is_leaf=_trees.is_masked,
  )  # fmt: skip
  cleared = pending._replace(
    write_mask=_trees.map_unmasked(jnp.zeros_like, pending.write_mask),
    write_pending=jnp.zeros((), jnp.bool_),
  )
  return new, cleared


def packnet_params(params: optax.Params, opt_state: Any, task: Any) -> optax.Params:
  r"""Task ``task``'s parameters :math:`\theta \odot [0 < \text{owner} \le d]` (a copy).

  ``opt_state`` is a :class:`PackNetState` or any optimiser state holding one;
  ``task`` :math:`d` is 1-based (the ``packnet_task`` during its training).
  Leaves without an owner map are returned as they are. Jittable; a new
  tree (the official ``apply_mask`` zeroes the live weights in place, which
  would destroy later tasks in a live model). Cost: one compare and select
  per pruned entry.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"l": {"kernel": jnp.array([[1.0, 2.0]])}}
    >>> state = cl_optax.packnet().init(params)
    >>> state = state._replace(packnet_owner={"l": {"kernel": jnp.array([[1, 2]], jnp.int8)}})
    >>> cl_optax.packnet_params(params, state, 1)["l"]["kernel"]
    Array([[1., 0.]], dtype=float32)
  """
  state = _trees.find_state(opt_state, PackNetState, "packnet_params")
  plain = _trees.unwrap_variables(params)

  def leaf(o, p):
    if _trees.is_masked(o):
      return p
    keep = (o > 0) & (o.astype(jnp.int32) <= jnp.asarray(task, jnp.int32))
    return jnp.where(keep, p, jnp.zeros((), jnp.asarray(p).dtype))

  return jax.tree.map(leaf, state.packnet_owner, plain, is_leaf=_trees.is_masked)


def packnet_share(task: int, tasks: int) -> float:
  r"""The equal-share prune fraction :math:`1 - 1/(T - t)` of task ``task`` (0-based) of ``tasks``.

  Each task keeps an equal share of the layer: 0.9, 0.889, ..., 0.5, 0.0 for
  10 tasks (the last task prunes nothing). A rule of the ContinualAI
  baselines' PackNet, not of the paper (which prunes 0.75 or 0.5).

  Example:
    >>> import cl_optax
    >>> [round(cl_optax.packnet_share(t, 4), 3) for t in range(4)]
    [0.75, 0.667, 0.5, 0.0]
  """
  if not 0 <= task < tasks:
    raise ValueError(f"packnet_share: `task` must be in [0, {tasks}); got {task}.")
  return 1.0 - 1.0 / (tasks - task)
