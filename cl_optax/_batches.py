"""How the estimators read ``batches``: a stacked ``(xs, ys)`` pair or an iterable."""

from __future__ import annotations

import jax.numpy as jnp


def is_stacked(batches) -> bool:
  return (
    isinstance(batches, tuple | list)
    and len(batches) == 2
    and all(hasattr(b, "ndim") for b in batches)
  )


def batch_list(batches, name: str):
  """Stacked ``(xs, ys)`` (integer ``ys`` with two leading axes), or an iterable."""
  if is_stacked(batches) and jnp.issubdtype(jnp.asarray(batches[1]).dtype, jnp.integer):
    xs, ys = batches
    return [(jnp.asarray(xs[i]), jnp.asarray(ys[i])) for i in range(len(xs))]
  out = []
  for b in batches:
    if isinstance(b, tuple | list):
      x, y = b[0], (b[1] if len(b) > 1 else None)
    else:
      x, y = b, None
    out.append((jnp.asarray(x), None if y is None else jnp.asarray(y)))
  if not out:
    raise ValueError(f"{name}: `batches` is empty; expected at least one (x, y) batch.")
  return out
