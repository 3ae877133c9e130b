"""GPM's basis storage: :func:`project_out` at static widths; :func:`append_columns`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def static_widths(top: int) -> tuple[int, ...]:
  """The static column counts a GPM step may read: 0, 16, 32, 64, ... up to ``top``."""
  widths, w = [0], 16
  while w < top:
    widths.append(w)
    w *= 2
  return tuple(sorted({*widths, top}))


def project_out(q, count, g):
  """``g - M M^T g`` for ``M = q[:, :count]``, through the fewer of M or its complement.

  ``q`` is orthogonal, so ``g - M M^T g = N N^T g`` for the other columns ``N``.
  Each static width is a ``lax.switch`` branch, so only that many columns are
  read: the cost is ``2 d_in w out`` with ``w`` the next width at or above
  ``min(count, d_in - count)``, 0 before the first task and once the space is full.
  """
  d_in = q.shape[0]
  widths = static_widths(d_in // 2)  # min(count, d_in - count) <= d_in // 2
  complement = count > d_in - count
  need = jnp.minimum(count, d_in - count)

  def branch(w):
    def project(q, g):
      if w == 0:
        return jnp.where(complement, jnp.zeros_like(g), g)
      start = jnp.where(complement, d_in - w, 0)
      cols = start + jnp.arange(w)
      keep = jnp.where(complement, cols >= count, cols < count)
      v = jnp.where(keep[None, :], jax.lax.dynamic_slice_in_dim(q, start, w, axis=1), 0.0)
      vvg = v @ (v.T @ g)
      return jnp.where(complement, vvg, g - vvg)

    return project

  index = jnp.searchsorted(jnp.asarray(widths), need)
  return jax.lax.switch(index, [branch(w) for w in widths], q.astype(g.dtype), g)


def project_scaled(q, count, scale, g):
  """``g - M diag(scale) M^T g`` for ``M = q[:, :count]`` (SGP: not a projector).

  Reads only the first ``w`` columns, ``w`` the next static width at or above
  ``count`` (a ``lax.switch`` branch each, as :func:`project_out`).
  """
  d_in = q.shape[0]
  widths = static_widths(d_in)

  def branch(w):
    def project(q, g):
      if w == 0:
        return g
      keep = jnp.arange(w) < count
      v = jnp.where(keep[None, :], q[:, :w], 0.0)
      lam = jnp.where(keep, scale[:w], 0.0).astype(g.dtype)
      return g - v @ (lam[:, None] * (v.T @ g))

    return project

  index = jnp.searchsorted(jnp.asarray(widths), count)
  return jax.lax.switch(index, [branch(w) for w in widths], q.astype(g.dtype), g)


def append_columns(basis, count, cols, r):
  """``basis`` with ``cols[:, :r]`` after its first ``count`` columns: ``(basis, count + r)``.

  The new columns are re-orthogonalised against the stored ones (float32 drift)
  and the columns from ``count + r`` on are refilled with an orthonormal basis of
  the complement, so the result stays an orthogonal ``[d_in, d_in]`` matrix
  (:func:`project_out` reads either side). ``r <= d_in - count`` (traced ints).
  """
  d_in = basis.shape[0]
  idx = jnp.arange(d_in)
  M = jnp.where(idx[None, :] < count, basis.astype(jnp.float32), 0.0)
  U = cols.astype(jnp.float32)
  U = U - M @ (M.T @ U)
  U = U / jnp.maximum(jnp.linalg.norm(U, axis=0, keepdims=True), 1e-30)
  src = idx - count
  take = (src >= 0) & (src < r)
  new = jnp.where(take[None, :], jnp.take(U, jnp.clip(src, 0, U.shape[1] - 1), axis=1), M)
  # The complement: I - M M^T has eigenvalue 0 on span(M) and 1 off it, and eigh
  # sorts ascending, so its eigenvectors from column `k` on span the rest.
  k = count + r
  _, V = jnp.linalg.eigh(jnp.eye(d_in, dtype=jnp.float32) - new @ new.T)
  return jnp.where(idx[None, :] < k, new, V).astype(basis.dtype), k
