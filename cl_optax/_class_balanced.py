r"""Class-balanced episodic memory: GDumb's greedy sampler, CBRS, boundary fill and shrink.

One flat memory of ``capacity`` slots whose slots carry their class, so that
the stream samplers (GDumb's greedy class-balanced sampler, CBRS) and the
boundary rebuilds of iCaRL / X-DER (keep the first ``m`` items of each class,
fill the free slots with the new classes' chosen items) are array operations
on fixed shapes, jittable, with explicit PRNG keys. Items are any pytree; the
labels the memory balances are passed beside them (keep ``y`` in the item too
if the loss needs it back from :func:`cl_optax.replay.sample`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_optax import _trees

PyTree = Any
RULES = ("greedy", "cbrs")


class ClassBalanced(NamedTuple):
  """A class-balanced memory (:func:`init_balanced`).

  Attributes:
    items: the stored items, leaves ``[capacity, *item_shape]``.
    slot_class: int32 ``[capacity]``: each slot's class, ``-1`` for an empty slot.
    slot_rank: int32 ``[capacity]``: when each slot was written (the order
      :func:`shrink` keeps within a class: herding or arrival order).
    class_count: int32 ``[num_classes]``: stored items per class.
    class_stream: int32 ``[num_classes]``: items per class offered to
      :func:`add_balanced` so far (CBRS's :math:`n_y`).
    class_full: bool ``[num_classes]``: CBRS's *full* classes (those that are
      or have once been the largest while the memory was full).
    write_count: int32 scalar: slots written so far (the next rank).
  """

  items: PyTree
  slot_class: jax.Array  # shape=(capacity,), int32
  slot_rank: jax.Array  # shape=(capacity,), int32
  class_count: jax.Array  # shape=(num_classes,), int32
  class_stream: jax.Array  # shape=(num_classes,), int32
  class_full: jax.Array  # shape=(num_classes,), bool
  write_count: jax.Array  # shape=(), int32


def init_balanced(example: PyTree, capacity: int, num_classes: int) -> ClassBalanced:
  """An empty class-balanced memory of ``capacity`` slots for items like ``example``.

  Args:
    example: one item (a pytree of arrays or ``jax.ShapeDtypeStruct``).
    capacity: the total number of slots :math:`K` (shared by all classes).
    num_classes: the number of classes :math:`C` the labels range over.

  Returns:
    A :class:`ClassBalanced` with every slot empty.
  """
  capacity, num_classes = int(capacity), int(num_classes)
  if capacity <= 0 or num_classes <= 0:
    raise ValueError(
      "replay.init_balanced: capacity and num_classes must be positive integers; got "
      f"{capacity} and {num_classes}."
    )
  dtype = lambda x: x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype  # noqa: E731
  items = jax.tree.map(lambda x: jnp.zeros((capacity, *np.shape(x)), dtype(x)), example)
  return ClassBalanced(
    items=items,
    slot_class=jnp.full((capacity,), -1, jnp.int32),
    slot_rank=jnp.zeros((capacity,), jnp.int32),
    class_count=jnp.zeros((num_classes,), jnp.int32),
    class_stream=jnp.zeros((num_classes,), jnp.int32),
    class_full=jnp.zeros((num_classes,), jnp.bool_),
    write_count=jnp.zeros((), jnp.int32),
  )


def _check_batch(memory: ClassBalanced, batch: PyTree, labels: Any, fn: str) -> jax.Array:
  if jax.tree.structure(batch) != jax.tree.structure(memory.items):
    raise ValueError(f"replay.{fn}: the batch must have the items' structure.")
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"replay.{fn}: `labels` must be integer [batch]; got {labels.dtype} {labels.shape}."
    )
  for m, x in zip(jax.tree.leaves(memory.items), jax.tree.leaves(batch)):
    if tuple(np.shape(x)) != (labels.shape[0], *m.shape[1:]):
      raise ValueError(
        f"replay.{fn}: a batch leaf has shape {np.shape(x)}; expected "
        f"({labels.shape[0]}, *{tuple(m.shape[1:])})."
      )
  num_classes = memory.class_count.shape[0]
  if (
    _trees.is_concrete(labels)
    and labels.size
    and not (0 <= int(labels.min()) and int(labels.max()) < num_classes)
  ):
    raise ValueError(f"replay.{fn}: labels must lie in [0, {num_classes}); got {labels.tolist()}.")
  return labels.astype(jnp.int32)


def _random_slot_of(slot_class: jax.Array, cls: jax.Array, key: jax.Array) -> jax.Array:
  """A uniformly drawn slot holding class ``cls`` (slot 0 when there is none)."""
  scores = jnp.where(slot_class == cls, jax.random.uniform(key, slot_class.shape), -1.0)
  return jnp.argmax(scores).astype(jnp.int32)


def _random_largest(count: jax.Array, key: jax.Array) -> jax.Array:
  """One of the classes with the most stored items, drawn uniformly."""
  largest = count == jnp.max(count)
  scores = jnp.where(largest, jax.random.uniform(key, count.shape), -1.0)
  return jnp.argmax(scores).astype(jnp.int32)


def _decide(mem: ClassBalanced, y: jax.Array, key: jax.Array, rule: str):
  """The slot that item of class ``y`` goes to (``capacity``: dropped) and the new full flags."""
  cap = mem.slot_class.shape[0]
  count, full = mem.class_count, mem.class_full
  k_victim, k_slot, k_coin = jax.random.split(key, 3)
  has_room = jnp.sum(count) < cap
  free_slot = jnp.argmax(mem.slot_class < 0).astype(jnp.int32)
  if rule == "greedy":
    n_seen = jnp.sum((count > 0) | (jnp.arange(count.shape[0]) == y))
    replace = count[y] * n_seen < cap  # count_y < K / |Y_seen|
    victim = _random_largest(count, k_victim)
  else:  # cbrs
    full = full | (~has_room & (count == jnp.max(count)))
    coin = jax.random.uniform(k_coin) * mem.class_stream[y] < count[y]  # p = m_y / n_y
    replace = ~full[y] | coin
    victim = jnp.where(full[y], y, _random_largest(count, k_victim))
  slot = jnp.where(replace, _random_slot_of(mem.slot_class, victim, k_slot), cap)
  return jnp.where(has_room, free_slot, slot), full


def _set(m: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
  """``m[slot] = x`` (dropped when ``slot`` is out of range), keeping ``m``'s sharding
  (an explicit-axes mesh needs the scatter's output sharding spelled out)."""
  return m.at[slot].set(x, mode="drop", out_sharding=jax.typeof(m).sharding)


def _write_one(mem: ClassBalanced, item: PyTree, y: jax.Array, slot: jax.Array) -> ClassBalanced:
  cap = mem.slot_class.shape[0]
  ok = slot < cap
  at = jnp.arange(cap) == slot  # a masked sum, not slot_class[slot]: no gather when sharded
  old = jnp.where(ok, jnp.sum(jnp.where(at, mem.slot_class, 0)), -1)
  count = mem.class_count.at[y].add(ok.astype(jnp.int32))
  count = count.at[jnp.maximum(old, 0)].add(-(old >= 0).astype(jnp.int32))
  items = jax.tree.map(lambda m, x: _set(m, slot, x.astype(m.dtype)), mem.items, item)
  return mem._replace(
    items=items,
    slot_class=_set(mem.slot_class, slot, y),
    slot_rank=_set(mem.slot_rank, slot, mem.write_count),
    class_count=count,
    write_count=mem.write_count + ok.astype(jnp.int32),
  )


def add_balanced(
  memory: ClassBalanced,
  batch: PyTree,
  labels: jax.Array,
  *,
  key: jax.Array,
  rule: str = "greedy",
  where: jax.Array | None = None,
) -> ClassBalanced:
  r"""Offers a batch (leaves ``[b, ...]``, ``labels`` int ``[b]``) item by item.

  While the memory has a free slot every item is stored. When it is full,
  for an item of class :math:`y` (the counts :math:`m_c` are stored items):

  * ``rule="greedy"`` (GDumb, Prabhu et al. 2020, Sec. 3): if
    :math:`m_y < K / |\mathcal{Y}_{seen}|` (:math:`y` counted as seen), a
    uniformly chosen item of a largest class (ties drawn uniformly) is
    replaced; otherwise the item is dropped. The official code
    (drimpossible/GDumb ``src/dataloader.py``) keeps, offline, the first
    :math:`K / C_{total}` items of each class; on a stream whose classes all
    arrive this rule reaches the same balance without knowing :math:`C_{total}`.
  * ``rule="cbrs"`` (Chrysakis & Moens, ICML 2020, Alg. 1): the largest
    classes are marked *full* (a mark that stays); if :math:`y` is not full, a
    uniformly chosen item of a largest class is replaced; otherwise, with
    probability :math:`m_y / n_y` (:math:`n_y` the class's stream count, this
    item included), a uniformly chosen stored item of class :math:`y` is
    replaced (reservoir sampling within the class), else the item is dropped.

  The items are processed in order with a ``lax.scan`` (each decision depends
  on the previous one); jittable, deterministic given ``key``.

  Args:
    memory: a :class:`ClassBalanced`.
    batch: items with a leading batch axis, the items' structure.
    labels: int ``[b]`` class of each item, in ``[0, num_classes)``.
    key: PRNG key.
    rule: ``"greedy"`` or ``"cbrs"`` (static; keep one rule per memory).
    where: optional bool ``[b]``: only these items are offered.

  Returns:
    The memory with the batch offered.
  """
  if rule not in RULES:
    raise ValueError(f"replay.add_balanced: rule must be one of {RULES}; got {rule!r}.")
  labels = _check_batch(memory, batch, labels, "add_balanced")
  valid = jnp.ones(labels.shape, jnp.bool_) if where is None else jnp.asarray(where, jnp.bool_)
  keys = jax.random.split(key, labels.shape[0])

  def step(mem, inputs):
    item, y, ok, k = inputs
    mem = mem._replace(class_stream=mem.class_stream.at[y].add(ok.astype(jnp.int32)))
    slot, full = _decide(mem, y, k, rule)
    slot = jnp.where(ok, slot, mem.slot_class.shape[0])
    mem = _write_one(mem._replace(class_full=jnp.where(ok, full, mem.class_full)), item, y, slot)
    return mem, None

  memory, _ = jax.lax.scan(step, memory, (batch, labels, valid, keys))
  return memory


def fill(
  memory: ClassBalanced, batch: PyTree, labels: jax.Array, *, where: jax.Array | None = None
) -> ClassBalanced:
  """Writes the batch's items into the free slots, in batch order; evicts nothing.

  The boundary half of iCaRL's and X-DER's rebuild: after :func:`shrink`,
  pass each new class's chosen items in the order they were chosen (herding
  order, :func:`cl_optax.replay.herding_select`, or arrival order) so that a
  later :func:`shrink` keeps the best-ranked ones. Items beyond the free
  slots are dropped; the stream counts are left as they are.

  Args:
    memory: a :class:`ClassBalanced`.
    batch: items with a leading batch axis.
    labels: int ``[b]`` class of each item.
    where: optional bool ``[b]``: only these items are written.

  Returns:
    The memory with the items written.
  """
  labels = _check_batch(memory, batch, labels, "fill")
  cap = memory.slot_class.shape[0]
  valid = jnp.ones(labels.shape, jnp.bool_) if where is None else jnp.asarray(where, jnp.bool_)
  order = jnp.cumsum(valid) - 1
  free = memory.slot_class < 0
  free_slots = jnp.argsort(~free, stable=True).astype(jnp.int32)
  n_free = jnp.sum(free)
  ok = valid & (order < n_free)
  slots = jnp.where(ok, free_slots[jnp.clip(order, 0, cap - 1)], cap)
  items = jax.tree.map(
    lambda m, x: m.at[slots].set(x.astype(m.dtype), mode="drop"), memory.items, batch
  )
  added = jnp.zeros_like(memory.class_count).at[labels].add(ok.astype(jnp.int32))
  return memory._replace(
    items=items,
    slot_class=memory.slot_class.at[slots].set(labels, mode="drop"),
    slot_rank=memory.slot_rank.at[slots].set(memory.write_count + order, mode="drop"),
    class_count=memory.class_count + added,
    write_count=memory.write_count + jnp.sum(ok).astype(jnp.int32),
  )


def class_order(memory: ClassBalanced) -> jax.Array:
  """Each slot's position within its class by rank (0 = written first); empty slots: -1."""
  cap = memory.slot_class.shape[0]
  perm = jnp.lexsort((memory.slot_rank, memory.slot_class))
  sorted_class = memory.slot_class[perm]
  first = jnp.searchsorted(sorted_class, sorted_class, side="left")
  pos = jnp.zeros((cap,), jnp.int32).at[perm].set((jnp.arange(cap) - first).astype(jnp.int32))
  return jnp.where(memory.slot_class >= 0, pos, -1)


def shrink(memory: ClassBalanced, per_class: Any) -> ClassBalanced:
  """Keeps the first ``per_class`` items of each class (by rank), frees the others.

  iCaRL's "reduce exemplar set" (Rebuffi et al. 2017, Alg. 5: keep
  :math:`p_1 \\ldots p_m`) and X-DER's rebuild (keep the first
  :math:`K / |\\mathcal{Y}_{seen}|` per class): the rank is the write order,
  so items filled in herding order keep their herding priority.

  Args:
    memory: a :class:`ClassBalanced`.
    per_class: an int (traced or not) or int ``[num_classes]``: the quota.

  Returns:
    The memory with at most ``per_class`` items of each class.
  """
  quota = jnp.broadcast_to(jnp.asarray(per_class, jnp.int32), memory.class_count.shape)
  cls = memory.slot_class
  keep = (cls >= 0) & (class_order(memory) < quota[jnp.maximum(cls, 0)])
  slot_class = jnp.where(keep, cls, -1)
  count = jnp.zeros_like(memory.class_count)
  count = count.at[jnp.maximum(slot_class, 0)].add(keep.astype(jnp.int32))
  return memory._replace(slot_class=slot_class, class_count=count)
