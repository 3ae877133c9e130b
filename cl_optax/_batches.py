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
  """Stacked ``(xs, ys)`` (integer ``ys`` with two leading axes), or an iterable.

  Raises a ``ValueError`` when there is no example: no batch, a stacked pair
  with zero batches, or only batches with zero rows.
  """
  if is_stacked(batches) and jnp.issubdtype(jnp.asarray(batches[1]).dtype, jnp.integer):
    xs, ys = batches
    out = [(jnp.asarray(xs[i]), jnp.asarray(ys[i])) for i in range(len(xs))]
  else:
    out = []
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
