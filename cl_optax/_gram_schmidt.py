"""Block Gram-Schmidt that grows OGD's fixed-capacity basis inside ``jit``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
import optax

from cl_optax._linalg import contract, set_row


def rows_dot(basis: Sequence[jax.Array], vec: Sequence[jax.Array]) -> jax.Array:
  """``[K]`` dot products of every basis row with ``vec`` (lists of leaves)."""
  return cast(
    jax.Array,
    sum(contract(b.astype(jnp.float32), v.astype(jnp.float32), v.ndim) for b, v in zip(basis, vec)),
  )


@jax.jit
def gram_schmidt_add(
  basis: Sequence[jax.Array],
  count: jax.Array,
  dropped: jax.Array,
  candidates: Sequence[jax.Array],
  rtol: jax.Array,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """Adds the candidates' new directions: block CGS2 against the stored rows,
  then Gram-Schmidt (twice) among the candidates themselves.

  The block pass reads the stored rows once per pass in chunks, up to the last
  filled one; the per-candidate pass reads only this call's new rows, so the
  cost grows with the directions stored, not with ``max_directions``.
  """
  cap = basis[0].shape[0]
  n = candidates[0].shape[0]
  v = [g.astype(jnp.float32) for g in candidates]
  norm0 = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in v))
  chunk = min(cap, 256)

  def against_chunk(c, v):
    rows = [jax.lax.dynamic_slice_in_dim(b, c * chunk, chunk).astype(jnp.float32) for b in basis]
    coef = cast(  # [chunk, n]
      jax.Array, sum(contract(r, x, (list(range(1, r.ndim)),) * 2) for r, x in zip(rows, v))
    )
    return [x - jnp.tensordot(coef.T, r, axes=1) for x, r in zip(v, rows)]

  n_chunks = (count + chunk - 1) // chunk
  for _ in range(2):  # "twice is enough" (re-orthogonalisation)
    v = jax.lax.fori_loop(0, n_chunks, against_chunk, v)

  block = min(n, cap)
  # This call's rows start here (the stored rows are 0 past count).
  first = jnp.minimum(count, cap - block)

  def body(i, carry):
    basis, count, dropped = carry
    x = [y[i] for y in v]
    new_rows = [jax.lax.dynamic_slice_in_dim(b, first, block).astype(jnp.float32) for b in basis]
    for _ in range(2):
      coef = rows_dot(new_rows, x)
      x = [y - jnp.tensordot(coef, r, axes=1) for y, r in zip(x, new_rows)]
    norm = jnp.sqrt(optax.tree.norm(x, squared=True))
    new = (norm > rtol * norm0[i]) & (norm > 0)
    fits = new & (count < cap)
    at = jnp.minimum(count, cap - 1)
    basis = [
      set_row(b, jnp.where(fits, y / jnp.where(fits, norm, 1.0), b[at].astype(jnp.float32)), at)
      for b, y in zip(basis, x)
    ]
    return basis, count + fits.astype(jnp.int32), dropped + (new & ~fits).astype(jnp.int32)

  return jax.lax.fori_loop(0, n, body, (list(basis), count, dropped))
