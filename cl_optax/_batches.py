"""The one batch form of the estimators: :class:`Batches`, :func:`stack_batches`, the scan.

Every estimator takes ``batches`` as a :class:`Batches` whose leaves carry a
leading ``[num_batches, batch, ...]`` axis and scans it inside one jitted call
(:func:`scan_mean`): the per-batch sums are added on device in batch order and
divided by the number of examples (or tokens) once at the end. Any other form
is refused by :func:`check_batches` with a message naming the form expected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HOW = (
  "expected cl_optax.importance.Batches(x, y) whose leaves carry a leading "
  "[num_batches, batch, ...] axis (y optional, [num_batches, batch] labels): one batch "
  "is Batches(x[None], y[None]), stacked arrays are Batches(xs, ys), and a list of "
  "(x, y) pairs is cl_optax.importance.stack_batches(pairs)."
)


def _what(x: Any) -> str:
  """``x`` described for a message: an array's shape, a sequence's length, else its type."""
  if hasattr(x, "shape"):
    return f"an array of shape {tuple(x.shape)}"
  if isinstance(x, tuple | list):
    return f"a {type(x).__name__} of {len(x)} elements"
  return f"a {type(x).__name__}"


class Batches(NamedTuple):
  """A task's data for an estimator: stacked batches with a leading batch-count axis.

  A pytree (a ``NamedTuple``), so it passes through ``jax.jit``; every leaf of
  ``x`` and ``y`` is ``[num_batches, batch, ...]``, the same two leading sizes
  everywhere. Build it from stacked arrays, or from a list of ``(x, y)`` pairs
  with :func:`stack_batches`.

  Attributes:
    x: the inputs, any pytree (an array, a dict of token ids and masks, ...).
    y: the labels, ``[num_batches, batch, ...]``, or ``None`` for estimators
      that do not read labels (MAS, DAS, the sampled or exact Fisher).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> b = cl_optax.importance.Batches(jnp.zeros((3, 8, 5)), jnp.zeros((3, 8), jnp.int32))
    >>> b.x.shape, b.y.shape
    ((3, 8, 5), (3, 8))
  """

  x: Any
  y: Any = None


def stack_batches(pairs: Iterable[tuple[Any, Any]]) -> Batches:
  """Stacks an iterable of ``(x, y)`` pairs of equal-size batches into one :class:`Batches`.

  Args:
    pairs: ``(x, y)`` pairs (``y`` may be ``None`` in every pair); ``x`` any
      pytree of ``[batch, ...]`` arrays, the same structure and shapes in
      every pair.

  Returns:
    ``Batches(x, y)`` with a leading ``[num_batches]`` axis on every leaf.

  Raises:
    ValueError: for no pair, an item that is not an ``(x, y)`` pair, or
      batches of different shapes (ragged: the sizes are named; drop or pad
      the short batch).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> pairs = [(jnp.ones((4, 2)), jnp.zeros(4, jnp.int32))] * 3
    >>> cl_optax.importance.stack_batches(pairs).x.shape
    (3, 4, 2)
  """
  items = list(pairs)
  if not items:
    raise ValueError("stack_batches: no (x, y) pair given; expected at least one batch.")
  for i, item in enumerate(items):
    if not (isinstance(item, tuple | list) and len(item) == 2):
      raise ValueError(f"stack_batches: item {i} is {_what(item)}; expected an (x, y) pair.")
  shapes = [[np.shape(leaf) for leaf in jax.tree.leaves(tuple(item))] for item in items]
  if any(s != shapes[0] for s in shapes):
    sizes = [s[0][0] if s and s[0] else None for s in shapes]
    odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
    raise ValueError(
      f"stack_batches: batches differ in shape (ragged): batch sizes {sizes}; batch 0 has "
      f"leaf shapes {shapes[0]}, batch {odd} {shapes[odd]}. Drop or pad the short batch so "
      "that every batch has the same shape."
    )
  return Batches(*(jax.tree.map(lambda *xs: jnp.stack(xs), *col) for col in zip(*items)))


def check_batches(batches: Any, name: str, *, labels: bool = False) -> Batches:
  """``batches`` checked to be a :class:`Batches` of consistent ``[num_batches, batch]`` axes.

  Raises a ``ValueError`` naming the estimator ``name`` and the form expected
  for anything else: a bare array or tuple, a list of pairs, a leaf without
  the two leading axes, leaves with different batch counts or batch sizes,
  no example, or (``labels``) no ``y``.
  """
  if not isinstance(batches, Batches):
    raise ValueError(f"{name}: `batches` is {_what(batches)}; {_HOW}")
  if labels and batches.y is None:
    raise ValueError(
      f"{name}: needs labels; got Batches with y=None (pass Batches(xs, ys), ys "
      "[num_batches, batch])."
    )
  sizes = {}
  for part in ("x", "y"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(batches, part)):
      where = f"batches.{part}{jax.tree_util.keystr(path)}"
      if np.ndim(leaf) < 2:
        raise ValueError(
          f"{name}: `{where}` has shape {np.shape(leaf)}; it needs two leading axes "
          "[num_batches, batch] (a single batch is Batches(x[None], y[None]))."
        )
      sizes[where] = tuple(np.shape(leaf)[:2])
  if not sizes:
    raise ValueError(f"{name}: `batches.x` has no array leaf; {_HOW}")
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{k}: {v[0]} batches of {v[1]}" for k, v in sizes.items())
    raise ValueError(
      f"{name}: the leaves of `batches` disagree on [num_batches, batch] ({listed}); every "
      "leaf needs the same leading two sizes."
    )
  if 0 in next(iter(sizes.values())):
    raise ValueError(
      f"{name}: `batches` is empty ({next(iter(sizes.values()))} [num_batches, batch]); "
      "expected at least one batch with at least one example."
    )
  return batches


def _zeros_like_shapes(tree: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def scan_sum(batch_sum: Callable[[Any, Any, Any], Any], batches: Batches) -> Any:
  """``sum_b batch_sum(b, x_b, y_b)`` over the batches, one ``lax.scan`` (batch order).

  Call it under ``jax.jit``: the sum starts from zeros and adds the batches
  in order, the same additions as a Python loop over the batches.
  """
  first = jax.tree.map(lambda v: v[0], batches)
  init = _zeros_like_shapes(jax.eval_shape(batch_sum, jnp.int32(0), first.x, first.y))

  def body(total, item):
    i, b = item
    return optax.tree.add(total, batch_sum(i, b.x, b.y)), None

  n = jax.tree.leaves(batches)[0].shape[0]
  return jax.lax.scan(body, init, (jnp.arange(n, dtype=jnp.int32), batches))[0]


def scan_mean(batch_sum: Callable[[Any, Any, Any], Any], batches: Batches) -> Any:
  """The mean over all examples of a per-example quantity (:func:`scan_sum` / examples).

  ``batch_sum(i, x, y)`` returns the sum over the examples of batch ``i``.
  """
  n, b = jax.tree.leaves(batches)[0].shape[:2]
  return jax.tree.map(lambda s: s / (n * b), scan_sum(batch_sum, batches))
