"""GPM's basis storage and projection, shared by GPM, SGP, Adam-NSCL, TRGP and InfLoRA.

:func:`project_out` at static widths, :func:`append_columns`, the per-kernel
update projection (:func:`project_updates`, :func:`project_kernel`), the basis
growth (:func:`grow_basis`) and the zero buffers at the projected kernels
(:func:`projected_buffers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _select, _trees


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


# ------------------------------------------------------- kernel updates


def project_leaf(
  path: Any,
  basis: jax.Array,
  count: jax.Array,
  u: jax.Array,
  orientation: str | None = None,
  scale: jax.Array | None = None,
) -> jax.Array:
  """A projected kernel's update with the protected input directions removed.

  With ``scale`` (SGP) each direction is removed by that fraction.
  """
  if scale is None:
    project = lambda g: project_out(basis, count, g)  # noqa: E731
  else:
    project = lambda g: project_scaled(basis, count, scale, g)  # noqa: E731
  return project_kernel(path, basis.shape[0], u, orientation, project)


def project_kernel(
  path: Any,
  d_in: int,
  u: jax.Array,
  orientation: str | None,
  project: Callable[[jax.Array], jax.Array],
  transform: str = "gpm",
) -> jax.Array:
  """``project`` applied to a kernel's update as ``[d_in, out]`` (float32).

  An update holding a non-finite entry passes unchanged (the projection would
  spread it over the kernel). An ``"out_in"`` weight is projected as its transpose.
  """
  shape = jnp.shape(u)
  if _select.kernel_orientation(transform, _trees.leaf_path(path), shape, orientation) == "out_in":
    return project_kernel(path, d_in, u.T, "in_out", project, transform).T
  if jnp.ndim(u) < 2 or int(np.prod(jnp.shape(u)[:-1])) != d_in:
    raise ValueError(
      f"{transform}: `updates` leaf {_trees.key_string(path)} has shape {jnp.shape(u)}; "
      f"expected a kernel whose input axes (all but the last) hold {d_in} entries, as at init."
    )
  g = u.reshape(d_in, -1).astype(jnp.float32)
  new = project(g).reshape(u.shape)
  return jnp.where(jnp.all(jnp.isfinite(g)), new.astype(u.dtype), u)


def freeze_leaf(u: Any, frozen: jax.Array) -> Any:
  """An unprojected leaf's update: zeros (finite entries) once ``frozen`` if it has fewer
  than 2 dimensions (a bias, a norm scale); an unprojected kernel passes unchanged."""
  return jax.tree.map(
    lambda x: jnp.where(frozen & jnp.isfinite(x), jnp.zeros_like(x), x) if jnp.ndim(x) < 2 else x,
    u,
  )


def project_updates(
  updates: optax.Updates,
  basis: Any,
  count: Any,
  frozen: jax.Array,
  *,
  orientation: str | None,
  freeze_unprojected: bool,
) -> optax.Updates:
  """Every projected kernel's update with its basis's directions removed (GPM, TRGP).

  ``basis`` / ``count``: the state's trees (masked where a leaf is not
  projected); an unprojected leaf passes, or goes through :func:`freeze_leaf`
  with ``frozen`` when ``freeze_unprojected``.
  """

  def leaf(path, b, c, u):
    if _trees.is_masked(u) or u is None:
      return u
    if _trees.is_masked(b):
      return freeze_leaf(u, frozen) if freeze_unprojected else u
    return project_leaf(path, b, c, u, orientation)

  return jax.tree_util.tree_map_with_path(leaf, basis, count, updates, is_leaf=_trees.is_masked)


# ------------------------------------------------------------ basis growth


@jax.jit
def grow_basis(basis, count, x, threshold, strict=False):
  """GPM Eq. 8-9: adds the top left singular vectors of the residual activations.

  ``strict``: ``#{k : cum_k < threshold}`` columns (the official code's first task).
  """
  d_in = basis.shape[0]
  idx = jnp.arange(d_in)
  R = x.T  # [d_in, n], columns are samples (the paper's R_l)
  M = jnp.where(idx[None, :] < count, basis.astype(jnp.float32), 0.0)
  total = jnp.sum(R * R)
  R_hat = R - M @ (M.T @ R)
  U, S, _ = jnp.linalg.svd(R_hat, full_matrices=False)  # U [d_in, m]
  safe_total = jnp.where(total > 0, total, 1.0)
  captured = (total - jnp.sum(R_hat * R_hat)) / safe_total
  cum = captured + jnp.cumsum(S * S) / safe_total
  # The smallest r with cum[r - 1] >= threshold (0 when already captured).
  below = jnp.sum(cum < threshold)
  r = jnp.where(captured >= threshold, 0, jnp.where(strict, below, below + 1))
  significant = jnp.sum(S > 1e-6 * jnp.maximum(S[0], 1e-30))
  r = jnp.minimum(jnp.minimum(r, significant), d_in - count)
  r = jnp.where(total > 0, r, 0).astype(jnp.int32)
  return append_columns(basis, count, U, r)


# ---------------------------------------------------------------- buffers


def _default_projected(params: optax.Params) -> Any:
  """The default ``layers``: every non-empty leaf with 2 or more dimensions."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2 and jnp.size(p) > 0, params)


class _Buffers(NamedTuple):
  basis: Any
  count: Any


def _init_buffers(
  labels: Any, params: optax.Params, dtype: Any, orientation: str | None = None
) -> tuple[Any, Any]:
  """Zero ``[d_in, d_in]`` bases and counts at the projected leaves, ``MaskedNode`` elsewhere."""

  def make(path, is_proj, p):
    if not is_proj or _trees.is_masked(p):  # not selected, or masked out by optax.masked
      return _Buffers(optax.MaskedNode(), optax.MaskedNode())
    shape = jnp.shape(p)
    if len(shape) < 2:
      raise ValueError(
        f"gpm: a projected leaf must have an input and an output axis; got shape {shape}."
      )
    if _select.kernel_orientation("gpm", _trees.leaf_path(path), shape, orientation) == "out_in":
      shape = shape[::-1]
    d_in = int(np.prod(shape[:-1]))
    return _Buffers(jnp.zeros((d_in, d_in), dtype), jnp.zeros((), jnp.int32))

  pairs = jax.tree_util.tree_map_with_path(make, labels, params)
  is_pair = lambda x: isinstance(x, _Buffers)  # noqa: E731  (not any 2-tuple: Equinox's layers)
  basis = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
  count = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
  return basis, count


def projected_buffers(layers, params, dtype, orientation, transform):
  """``(basis, count)`` trees at the kernels ``layers`` selects (``MaskedNode`` elsewhere)."""
  labels, by_selector = _select.labels(layers, params, _default_projected)
  if by_selector:  # a layer selector projects the kernels of the layers it selects
    labels = jax.tree.map(lambda m, p: m and jnp.ndim(p) >= 2, labels, params)
    if not any(jax.tree.leaves(labels)):
      raise ValueError(
        f"{transform}: the selector {layers!r} selects no leaf with 2 or more axes; parameter "
        f"paths: {[p for p, _ in _select.leaves_with_paths(params)][:20]}."
      )
  return _init_buffers(labels, params, dtype, orientation)
