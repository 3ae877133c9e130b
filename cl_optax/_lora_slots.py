"""The slot machinery O-LoRA and InfLoRA share: frozen leaves, the slot write, the moment reset.

Both wrap the whole optimiser (``inner``) as :func:`cl_optax.unit_resets`
does, so that a boundary write of a new adapter also resets ``inner``'s
moments of the written entries (the official codes start each task with a
fresh optimiser). The write is a :class:`cl_optax._writes.PendingWrite` kept
only on the branch leaves (``MaskedNode`` elsewhere: no buffer shaped like a
frozen base kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax import _trees, _unit_resets, _writes
from cl_optax._lora import Branch, find_branches


def branch_layout(params: Any, transform: str) -> tuple[list[Branch], Any]:
  """The branches of ``params`` and the treedef of its leaves (``MaskedNode`` a leaf)."""
  branches, _ = find_branches(_trees.unwrap_variables(params), transform=transform)
  return branches, jax.tree.structure(params, is_leaf=_trees.is_masked)


def branch_indices(branches: Sequence[Branch]) -> set[int]:
  return {i for br in branches for i in br[1:]}


def restricted(tree: Any, keep: set[int]) -> Any:
  """``tree`` with every leaf whose index is not in ``keep`` replaced by ``MaskedNode``."""
  leaves, tdef = jax.tree.flatten(tree, is_leaf=_trees.is_masked)
  return tdef.unflatten([x if i in keep else optax.MaskedNode() for i, x in enumerate(leaves)])


def init_write(params: Any, branches: Sequence[Branch]) -> _writes.PendingWrite:
  """An empty write laid out like the branch leaves only."""
  return _writes.init_pending(restricted(_trees.unwrap_variables(params), branch_indices(branches)))


def zero_leaves(updates: Any, frozen: set[int]) -> Any:
  """The updates with the finite entries of the leaves in ``frozen`` set to zero."""
  leaves, tdef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)

  def zero(x):
    return jnp.where(jnp.isfinite(x), jnp.zeros_like(x), x)

  return tdef.unflatten(
    [zero(x) if i in frozen and not _trees.is_masked(x) else x for i, x in enumerate(leaves)]
  )


def _merge(updates: Any, sub: Any, keep: set[int]) -> Any:
  leaves, tdef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)
  new = jax.tree.leaves(sub, is_leaf=_trees.is_masked)
  return tdef.unflatten([new[i] if i in keep else x for i, x in enumerate(leaves)])


def wrapped_update(
  inner: optax.GradientTransformation,
  updates: Any,
  inner_state: Any,
  write: _writes.PendingWrite,
  params: Any,
  frozen: set[int],
  keep: set[int],
  transform: str,
  **extra_args: Any,
) -> tuple[Any, Any, _writes.PendingWrite]:
  """Frozen leaves zeroed (before and after ``inner``: weight decay), ``inner``'s step,
  its moments reset where a write is pending, then the write emitted last."""
  if params is None:
    raise ValueError(f"{transform}: update needs `params` (the boundary write lands on them).")
  updates = zero_leaves(updates, frozen)
  updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
  updates = zero_leaves(updates, frozen)
  mask_leaves = jax.tree.leaves(write.write_mask, is_leaf=_trees.is_masked)
  masks = {i: m for i, m in enumerate(mask_leaves) if i in keep}

  def reset(s):
    return _unit_resets._zero_at(inner, s, params, masks)  # noqa: SLF001  (the one home of it)

  inner_state = jax.lax.cond(write.write_pending, reset, lambda s: s, inner_state)
  sub, write = _writes.emit(
    restricted(updates, keep), write, restricted(params, keep), transform=transform
  )
  return _merge(updates, sub, keep), inner_state, write


def boundary_view(write: _writes.PendingWrite, params: Any, transform: str):
  """At ``consolidate``: the branches and the leaves of ``params`` in the layout seen at init."""
  plain = _trees.restrict_like(
    write.write_target, _trees.unwrap_variables(params), transform=transform, name="params"
  )
  branches, _ = find_branches(plain, transform=transform)
  return branches, jax.tree.leaves(plain, is_leaf=_trees.is_masked)


def slot_write(
  write: _writes.PendingWrite,
  leaves: list,
  branches: Sequence[Branch],
  slot: jax.Array,
  new_a: Sequence[jax.Array],
  store: jax.Array,
  transform: str,
) -> _writes.PendingWrite:
  """Schedules, per branch: ``lora_slots_*[slot] <- lora_*`` (where ``store``), then
  ``lora_a <- new_a`` and ``lora_b <- 0``.

  Raises a ``ValueError`` (when ``slot`` is concrete) if every slot is taken.
  """
  cap = int(jnp.shape(leaves[branches[0].slots_a])[0]) if branches else 0
  if branches and _trees.is_concrete(slot) and bool(store) and int(slot) >= cap:
    raise ValueError(
      f"{transform}: all {cap} adapter slots are taken; the branches need a larger slot "
      "capacity S (lora_slots_a [S, d_in, r]) for this many tasks."
    )
  targets: dict[int, Any] = {}
  masks: dict[int, Any] = {}
  for br, a_new in zip(branches, new_a, strict=True):
    a, b = leaves[br.a], leaves[br.b]
    rows = (jnp.arange(cap) == slot) & store
    targets[br.slots_a] = jnp.broadcast_to(a, leaves[br.slots_a].shape)
    targets[br.slots_b] = jnp.broadcast_to(b, leaves[br.slots_b].shape)
    masks[br.slots_a] = masks[br.slots_b] = rows[:, None, None]
    targets[br.a], masks[br.a] = a_new.astype(a.dtype), True
    targets[br.b], masks[br.b] = jnp.zeros_like(b), True
  tdef = jax.tree.structure(write.write_target, is_leaf=_trees.is_masked)
  n = tdef.num_leaves
  t_tree = tdef.unflatten([targets.get(i, optax.MaskedNode()) for i in range(n)])
  m_tree = tdef.unflatten([masks.get(i, optax.MaskedNode()) for i in range(n)])
  return _writes.schedule(write, t_tree, m_tree)
