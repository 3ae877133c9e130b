"""How the estimators read ``batches`` and average over them.

``batches`` is a stacked ``(xs, ys)`` pair or an iterable of batches; every
estimator sums a per-batch quantity on device and divides by the number of
examples (or tokens) once at the end (:func:`weighted_mean`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import optax

Batches = tuple[jax.Array, jax.Array] | Iterable[Any]
"""A stacked ``(xs, ys)`` pair (leading number-of-batches axis) or an iterable of batches."""


def is_stacked(batches: Any) -> TypeGuard[tuple[Any, Any]]:
  """Whether ``batches`` is a stacked pair ``(xs, ys)`` of arrays (not an iterable of batches)."""
  return (
    isinstance(batches, tuple | list)
    and len(batches) == 2
    and all(hasattr(b, "ndim") for b in batches)
  )


def batch_list(batches: Batches, name: str) -> list[tuple[jax.Array, jax.Array | None]]:
  """Stacked ``(xs, ys)`` (integer ``ys`` with two leading axes), or an iterable.

  Raises a ``ValueError`` when there is no example: no batch, a stacked pair
  with zero batches, or only batches with zero rows.
  """
  out: list[tuple[jax.Array, jax.Array | None]] = []
  if is_stacked(batches) and jnp.issubdtype(jnp.asarray(batches[1]).dtype, jnp.integer):
    xs, ys = batches
    out = [(jnp.asarray(xs[i]), jnp.asarray(ys[i])) for i in range(len(xs))]
  else:
    for b in batches:
      if isinstance(b, tuple | list):
        x, y = b[0], (b[1] if len(b) > 1 else None)
      else:
        x, y = b, None
      out.append((jnp.asarray(x), None if y is None else jnp.asarray(y)))
  if not out or all(jnp.ndim(x) == 0 or x.shape[0] == 0 for x, _ in out):
    raise ValueError(
      f"{name}: `batches` is empty ({len(out)} batches, "
      f"{sum(x.shape[0] for x, _ in out if jnp.ndim(x))} examples); expected at least one "
      "(x, y) batch with at least one example."
    )
  return out


def weighted_mean(sums: Iterable[tuple[Any, Any]], count: Any = 0) -> Any:
  """``sum_b s_b / (count + sum_b n_b)`` over ``(s_b, n_b)`` pairs; ``None`` when there is none.

  ``s_b`` is a pytree (a batch's sum over its examples), ``n_b`` the batch's
  example (or token) count; the trees are added on device and divided once.
  """
  total = None
  for s, n in sums:
    total = s if total is None else optax.tree.add(total, s)
    count = count + n
  return None if total is None else jax.tree.map(lambda s: s / count, total)


def example_mean(
  batch_sum: Callable[[int, jax.Array, jax.Array | None], Any], batches: Batches, name: str
) -> Any:
  """The mean over all examples of ``batches`` of a per-example quantity.

  ``batch_sum(i, x, y)`` returns the sum over the examples of batch ``i``
  (``y`` is ``None`` for unlabelled batches); the sums are added and divided
  by the number of examples. Raises a ``ValueError`` naming ``name`` when
  ``batches`` holds no example.
  """
  pairs = batch_list(batches, name)
  return weighted_mean((batch_sum(i, x, y), x.shape[0]) for i, (x, y) in enumerate(pairs))
