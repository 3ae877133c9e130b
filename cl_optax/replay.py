"""Fixed-capacity episodic memory as a pytree: reservoir, per-task rings, class-balanced.

A memory is a ``NamedTuple`` of arrays with static shapes, so it is carried
through a jitted train step like the optimiser state, and ``init`` / ``add`` /
``sample`` all run under ``jit`` with explicit PRNG keys:

* :class:`Reservoir` (``init(example, capacity)``): every item offered so far
  is in the memory with the same probability ``capacity / seen`` (Vitter's
  algorithm R), whatever the task boundaries; used by A-GEM / ER.
* :class:`TaskRing` (``init(example, capacity, num_tasks=T)``): ``capacity``
  slots per task, each task's ring holding its most recent items (GEM's
  memory, ``n_memories`` per task).
* :class:`ClassBalanced` (``init_balanced(example, capacity, num_classes)``):
  one pool of slots that know their class, filled from the stream by GDumb's
  greedy sampler or CBRS (:func:`add_balanced`), rebuilt at a boundary by
  :func:`shrink` and :func:`fill` (iCaRL's herding order from
  :func:`herding_select`, X-DER's first-k per class); :func:`sample` with
  ``balanced=True`` draws classes about equally. :func:`class_means` and
  :func:`nme_predict` are iCaRL's nearest-mean-of-exemplars classifier.

An item is any pytree of arrays (e.g. ``(x, y)``, or ``{"x", "y", "logits"}``
for DER); ``example`` gives the shape and dtype of one item, and a batch is the
same pytree with a leading axis. :func:`experience_replay` is the transform that
adds a memory batch's gradient to the current one (ER, DER++'s second term).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from cl_optax import replay
  >>> mem = replay.init((jnp.zeros(2), jnp.int32(0)), capacity=4)
  >>> batch = (jnp.ones((3, 2)), jnp.arange(3, dtype=jnp.int32))
  >>> mem = replay.add(mem, batch, key=jax.random.key(0))
  >>> int(mem.seen), replay.filled(mem).tolist()
  (3, [True, True, True, False])
  >>> (x, y), valid = replay.sample(mem, jax.random.key(1), 2)
  >>> x.shape, valid.tolist()
  ((2, 2), [True, True])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cl_optax import _trees
from cl_optax._class_balanced import ClassBalanced as ClassBalanced
from cl_optax._class_balanced import add_balanced as add_balanced
from cl_optax._class_balanced import fill as fill
from cl_optax._class_balanced import init_balanced as init_balanced
from cl_optax._class_balanced import shrink as shrink
from cl_optax._experience_replay import ExperienceReplayState as ExperienceReplayState
from cl_optax._experience_replay import experience_replay as experience_replay
from cl_optax._herding import class_means as class_means
from cl_optax._herding import herding_select as herding_select
from cl_optax._herding import nme_predict as nme_predict

__all__ = [
  "ClassBalanced",
  "ExperienceReplayState",
  "Memory",
  "Reservoir",
  "TaskRing",
  "add",
  "add_balanced",
  "class_means",
  "experience_replay",
  "fill",
  "filled",
  "herding_select",
  "init",
  "init_balanced",
  "nme_predict",
  "sample",
  "sample_indices",
  "shrink",
  "take",
  "write",
]

PyTree = Any


class Reservoir(NamedTuple):
  """A reservoir-sampled memory.

  Attributes:
    items: the stored items, leaves ``[capacity, *item_shape]``.
    seen: how many items were offered to :func:`add` so far (int32).
  """

  items: PyTree
  seen: jax.Array  # shape=(), int32


class TaskRing(NamedTuple):
  """One ring buffer per task.

  Attributes:
    items: the stored items, leaves ``[num_tasks, capacity, *item_shape]``.
    written: per task, how many items were added so far (int32 ``[num_tasks]``);
      slot ``j`` of task ``t`` holds an item iff ``j < min(written[t], capacity)``.
  """

  items: PyTree
  written: jax.Array  # shape=(num_tasks,), int32


Memory = Reservoir | TaskRing | ClassBalanced


def init(example: PyTree, capacity: int, *, num_tasks: int | None = None) -> Memory:
  """An empty memory for items shaped like ``example``.

  Args:
    example: one item (a pytree of arrays or ``jax.ShapeDtypeStruct``).
    capacity: the number of slots (per task for a ring).
    num_tasks: ``None`` for a :class:`Reservoir`; the number of tasks for a
      :class:`TaskRing`.

  Returns:
    A :class:`Reservoir` or a :class:`TaskRing` filled with zeros.
  """
  capacity = int(capacity)
  if capacity <= 0:
    raise ValueError(f"replay.init: capacity must be a positive integer; got {capacity}.")
  lead = (capacity,) if num_tasks is None else (int(num_tasks), capacity)
  dtype = lambda x: x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype  # noqa: E731
  items = jax.tree.map(lambda x: jnp.zeros(lead + tuple(np.shape(x)), dtype(x)), example)
  if num_tasks is None:
    return Reservoir(items=items, seen=jnp.zeros((), jnp.int32))
  if int(num_tasks) <= 0:
    raise ValueError(f"replay.init: num_tasks must be a positive integer; got {num_tasks}.")
  return TaskRing(items=items, written=jnp.zeros((int(num_tasks),), jnp.int32))


def _capacity(memory: Memory) -> int:
  leaf = jax.tree.leaves(memory.items)[0]
  return int(leaf.shape[1] if isinstance(memory, TaskRing) else leaf.shape[0])


def _batch_size(memory: Memory, batch: PyTree) -> int:
  slot_tree = jax.tree.structure(memory.items)
  if jax.tree.structure(batch) != slot_tree:
    raise ValueError(
      f"replay.add: the batch must have the items' structure {slot_tree}; "
      f"got {jax.tree.structure(batch)}."
    )
  skip = 1 if isinstance(memory, Reservoir) else 2
  sizes = set()
  for m, b in zip(jax.tree.leaves(memory.items), jax.tree.leaves(batch)):
    if np.ndim(b) < 1 or tuple(np.shape(b)[1:]) != tuple(m.shape[skip:]):
      raise ValueError(
        f"replay.add: a batch leaf has shape {np.shape(b)}; expected (batch, "
        f"*{tuple(m.shape[skip:])})."
      )
    sizes.add(int(np.shape(b)[0]))
  if len(sizes) != 1:
    raise ValueError(f"replay.add: batch leaves have different leading sizes {sorted(sizes)}.")
  return sizes.pop()


def _scatter_last_wins(items, batch, slots, capacity):
  """``items[slots[i]] = batch[i]``, the later ``i`` winning; slot ``capacity`` drops."""
  b = slots.shape[0]
  winner = (
    jnp.full((capacity,), -1, jnp.int32).at[slots].max(jnp.arange(b, dtype=jnp.int32), mode="drop")
  )
  take = winner >= 0
  src = jnp.maximum(winner, 0)

  def leaf(m, x):
    new = jnp.take(x, src, axis=0).astype(m.dtype)
    return jnp.where(take.reshape((-1,) + (1,) * (m.ndim - 1)), new, m)

  return jax.tree.map(leaf, items, batch)


def add(memory: Memory, batch: PyTree, *, key: jax.Array | None = None, task: Any = None) -> Memory:
  """Offers a batch of items (leaves ``[b, *item_shape]``) to the memory.

  Args:
    memory: a :class:`Reservoir` or :class:`TaskRing`.
    batch: items with a leading batch axis.
    key: PRNG key (a :class:`Reservoir` needs one).
    task: the task the batch belongs to (a :class:`TaskRing` needs it; an int
      or an int32 scalar, traced or not).

  Returns:
    The memory with the batch added. A reservoir treats the batch as ``b``
    items offered one after the other (algorithm R): item ``n`` (0-based,
    counting every item ever offered) fills slot ``n`` while there is room,
    later replaces a uniformly chosen slot with probability ``capacity / (n+1)``.
    A ring writes the batch after the task's most recent item, overwriting
    the oldest ones. A batch of zero items leaves the memory as it is;
    items are stored as given (non-finite values too).
  """
  if isinstance(memory, ClassBalanced):
    raise ValueError("replay.add: a ClassBalanced memory takes labels: use replay.add_balanced.")
  b = _batch_size(memory, batch)
  cap = _capacity(memory)
  if b == 0:  # nothing offered: the memory (and its count) stays as it is
    return memory
  if isinstance(memory, Reservoir):
    if key is None:
      raise ValueError("replay.add: a Reservoir needs `key=` (a PRNG key).")
    n = memory.seen + jnp.arange(b, dtype=jnp.int32)
    j = jax.random.randint(key, (b,), 0, jnp.maximum(n + 1, 1), dtype=jnp.int32)
    slots = jnp.where(n < cap, n, jnp.where(j < cap, j, cap))
    items = _scatter_last_wins(memory.items, batch, slots, cap)
    return Reservoir(items=items, seen=memory.seen + b)
  if task is None:
    raise ValueError("replay.add: a TaskRing needs `task=` (the task id of the batch).")
  num_tasks = memory.written.shape[0]
  if _trees.is_concrete(task) and not 0 <= int(task) < num_tasks:
    raise ValueError(f"replay.add: task {int(task)} is outside [0, {num_tasks}).")
  task = jnp.asarray(task, jnp.int32)
  slots = (memory.written[task] + jnp.arange(b, dtype=jnp.int32)) % cap
  rows = jax.tree.map(lambda m: m[task], memory.items)
  rows = _scatter_last_wins(rows, batch, slots, cap)
  items = jax.tree.map(lambda m, r: m.at[task].set(r), memory.items, rows)
  return TaskRing(items=items, written=memory.written.at[task].add(b))


def filled(memory: Memory) -> jax.Array:
  """Which slots hold an item: bool ``[capacity]`` or ``[num_tasks, capacity]``."""
  if isinstance(memory, ClassBalanced):
    return memory.slot_class >= 0
  cap = _capacity(memory)
  if isinstance(memory, Reservoir):
    return jnp.arange(cap) < jnp.minimum(memory.seen, cap)
  return jnp.arange(cap)[None, :] < jnp.minimum(memory.written, cap)[:, None]


def sample(
  memory: Memory,
  key: jax.Array,
  batch_size: int,
  *,
  tasks: jax.Array | None = None,
  balanced: bool = False,
) -> tuple[PyTree, jax.Array]:
  """Draws ``batch_size`` distinct stored items uniformly (without replacement).

  In a jitted step (or ``lax.scan`` body) that also calls :func:`add` on a
  :class:`TaskRing` with ``tasks`` excluding the task being written, call
  :func:`add` first and sample from its result: the draw is the same, and XLA
  can then update the memory in place (when the read comes before the write,
  XLA:CPU copies the whole memory, twice per step, so the step's cost grows
  with the memory's size).

  Args:
    memory: a :class:`Reservoir`, :class:`TaskRing` or :class:`ClassBalanced`.
    key: PRNG key.
    batch_size: number of items (static).
    tasks: for a ring, an optional bool ``[num_tasks]`` mask of the tasks to
      draw from (A-GEM: the tasks before the current one); all by default.
    balanced: for a :class:`ClassBalanced`, draw each item with probability
      proportional to ``1 / (stored items of its class)`` (successively,
      without replacement: Gumbel top-k), so that every stored class is about
      equally likely (the class-weighted replay CBRS pairs with its memory).

  Returns:
    ``(batch, valid)``: the items (leaves ``[batch_size, ...]``) and a bool
    ``[batch_size]`` mask, ``False`` for rows beyond the number of stored items
    (those rows hold slot contents that must be ignored, e.g. by weighting the
    loss with ``valid``).
  """
  idx, valid = sample_indices(memory, key, batch_size, tasks=tasks, balanced=balanced)
  return take(memory, idx), valid


def _flat(memory: Memory, tasks: jax.Array | None) -> tuple[PyTree, jax.Array]:
  """The items with one slot axis, and which slots may be drawn."""
  full = filled(memory)
  if not isinstance(memory, TaskRing):
    return memory.items, full
  if tasks is not None:
    if tuple(np.shape(tasks)) != (full.shape[0],):
      raise ValueError(
        f"replay.sample: `tasks` has shape {tuple(np.shape(tasks))}; expected ({full.shape[0]},)."
      )
    full = full & jnp.asarray(tasks, jnp.bool_)[:, None]
  items = jax.tree.map(lambda m: m.reshape((-1,) + m.shape[2:]), memory.items)
  return items, full.reshape(-1)


def _replicated(x: jax.Array) -> jax.Array:
  """``x`` unsharded (one small vector: the slots' scores) under an explicit-axes mesh,
  where ``top_k`` refuses a sharded axis; unchanged otherwise."""
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec):
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
  return x


def _rows(m: jax.Array, indices: jax.Array) -> jax.Array:
  """``m[indices]`` along the first axis; under an explicit-axes mesh the rows come back
  unsharded along it (the other axes keep their sharding)."""
  sharding = jax.typeof(m).sharding
  if isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec):
    spec = PartitionSpec(None, *tuple(sharding.spec)[1:])
    return m.at[indices].get(out_sharding=NamedSharding(sharding.mesh, spec))
  return jnp.take(m, indices, axis=0)


def sample_indices(
  memory: Memory,
  key: jax.Array,
  batch_size: int,
  *,
  tasks: jax.Array | None = None,
  balanced: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The slots :func:`sample` draws: int32 ``[batch_size]`` flat slot indices and ``valid``.

  A :class:`TaskRing`'s slots are numbered ``task * capacity + j``. Use with
  :func:`take` to read the items and :func:`write` to change them in place
  (X-DER's rewrite of the stored logits). Arguments as :func:`sample`.
  """
  _, full = _flat(memory, tasks)
  size = full.shape[0]
  if batch_size > size:
    raise ValueError(f"replay.sample: batch_size {batch_size} exceeds the {size} slots.")
  if balanced and not isinstance(memory, ClassBalanced):
    raise ValueError("replay.sample: balanced=True needs a ClassBalanced memory (labels).")
  noise = jax.random.uniform(key, (size,))
  if balanced and isinstance(memory, ClassBalanced):
    own = memory.slot_class[:, None] == jnp.arange(memory.class_count.shape[0])
    count = jnp.sum(jnp.where(own, memory.class_count, 0), axis=1)  # no gather: shards
    gumbel = -jnp.log(-jnp.log(jnp.clip(noise, 1e-12, 1.0 - 1e-7)))
    noise = jnp.exp(gumbel - jnp.log(jnp.maximum(count, 1)).astype(jnp.float32))
  scores = _replicated(jnp.where(full, noise, -1.0))  # top_k runs over the whole axis
  top, idx = jax.lax.top_k(scores, batch_size)
  return idx.astype(jnp.int32), top >= 0


def take(memory: Memory, indices: jax.Array) -> PyTree:
  """The items at flat slot ``indices`` (as :func:`sample_indices` numbers them)."""
  items, _ = _flat(memory, None)
  return jax.tree.map(lambda m: _rows(m, indices), items)


def write(
  memory: Memory, indices: jax.Array, items: PyTree, *, where: jax.Array | None = None
) -> Memory:
  """Overwrites the items at flat slot ``indices`` (``where``: only those rows).

  The stored items change, not which slots are filled nor their classes:
  X-DER rewrites the logits stored with sampled items (pass the whole item
  with its new logits). Jittable; among repeated indices one row wins.
  """
  idx = jnp.asarray(indices, jnp.int32)
  cap = jax.tree.leaves(_flat(memory, None)[0])[0].shape[0]
  if where is not None:
    idx = jnp.where(jnp.asarray(where, jnp.bool_), idx, cap)

  def leaf(m, x):
    flat = m.reshape((-1,) + m.shape[2:]) if isinstance(memory, TaskRing) else m
    return flat.at[idx].set(jnp.asarray(x, m.dtype), mode="drop").reshape(m.shape)

  return memory._replace(items=jax.tree.map(leaf, memory.items, items))
