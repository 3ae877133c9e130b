r"""SGP: scaled gradient projection (Saha & Roy, AAAI 2023), on GPM's basis storage."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._gpm_project import freeze_leaf, grow_basis, project_leaf, projected_buffers
from cl_optax._gpm_signals import layer_signals


class SGPState(NamedTuple):
  """State of :func:`sgp`.

  Attributes:
    sgp_basis: per projected kernel, an orthogonal ``[d_in, d_in]`` matrix whose
      first ``sgp_count`` columns are the basis :math:`M` (as GPM's ``feature_basis``).
    sgp_count: per projected kernel, the number of basis columns (int32).
    sgp_importance: per projected kernel, :math:`\\lambda` ``[d_in]``, the
      importance of each basis column (0 beyond ``sgp_count``).
    sgp_tasks: number of consolidates so far (int32).
    sgp_threshold: the default energy threshold (refreshed at every update).
    sgp_alpha: :math:`\\alpha` of the importance (refreshed at every update).
  """

  TRANSFORM = "sgp"
  SIGNALS = ("representations", "threshold")
  EXTRA_ARGS = ()

  sgp_basis: Any
  sgp_count: Any
  sgp_importance: Any
  sgp_tasks: jax.Array  # shape=(), int32
  sgp_threshold: jax.Array  # shape=(), float32
  sgp_alpha: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> SGPState:
    """Grows each basis (GPM's official rule) and updates the importances (SGP Eq. 2)."""
    inputs = layer_signals(self.sgp_basis, params, signals, self.sgp_threshold, "sgp")
    leaves = zip(
      inputs,
      _trees.unmasked_leaves(self.sgp_basis),
      _trees.unmasked_leaves(self.sgp_count),
      _trees.unmasked_leaves(self.sgp_importance),
      strict=True,
    )
    first = self.sgp_tasks == 0
    new = [_sgp_grow(b, c, lam, x, thr, self.sgp_alpha, first) for (x, thr), b, c, lam in leaves]
    return self._replace(
      sgp_basis=_trees.replace_unmasked(self.sgp_basis, [n[0] for n in new]),
      sgp_count=_trees.replace_unmasked(self.sgp_count, [n[1] for n in new]),
      sgp_importance=_trees.replace_unmasked(self.sgp_importance, [n[2] for n in new]),
      sgp_tasks=self.sgp_tasks + 1,
    )


@jax.jit
def _sgp_grow(basis, count, lam, x, threshold, alpha, first):
  """GPM growth (first task ``#{cum < eps}``) and SGP's importances of old and new columns."""
  new_basis, new_count = grow_basis(basis, count, x, threshold, first)
  d_in = basis.shape[0]
  idx = jnp.arange(d_in)
  R = x.T.astype(jnp.float32)
  M = jnp.where(idx[None, :] < count, basis.astype(jnp.float32), 0.0)
  old = jnp.linalg.norm(M.T @ R, axis=1)  # sigma'_i = |m_i^T R_p| = |m_i^T R|
  S = jnp.linalg.svd(R - M @ (M.T @ R), compute_uv=False)  # the residual's singular values
  fresh = jnp.take(S, jnp.clip(idx - count, 0, S.shape[0] - 1))
  v = jnp.where(idx < count, old, jnp.where(idx < new_count, fresh, 0.0))
  top = jnp.max(v)
  den = alpha * v + top
  scaled = jnp.where(den > 0, (alpha + 1.0) * v / jnp.where(den > 0, den, 1.0), 0.0)
  lam = jnp.where(
    idx < count, jnp.clip(lam + scaled, 0.0, 1.0), jnp.where(idx < new_count, scaled, 0.0)
  )
  return new_basis, new_count, lam.astype(jnp.float32)


def sgp(
  threshold: float = 0.97,
  *,
  alpha: float = 10.0,
  layers: Any = None,
  orientation: str | None = None,
  freeze_unprojected: bool = True,
  basis_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGP: scaled gradient projection (Saha & Roy, AAAI 2023).

  GPM (:func:`cl_optax.gpm`) removes the whole gradient component in the
  stored input subspace; SGP removes a fraction :math:`\lambda_i \in (0, 1]`
  along each basis vector :math:`m_i`, by its importance, so unimportant old
  directions stay partly trainable:

  .. math::
    \nabla W \leftarrow \nabla W - M\,\mathrm{diag}(\lambda)\,M^\top \nabla W,
    \qquad \lambda_i = \frac{(\alpha + 1)\,\sigma_i}{\alpha\,\sigma_i + \max_j \sigma_j}
    \quad \text{(Eq. 2)}.

  ``cl_optax.consolidate(state, params, representations=...)`` (as for
  :func:`cl_optax.gpm`) grows the basis by GPM's rule and sets :math:`\lambda`
  on singular values :math:`\sigma` (not squared): on the first task over the
  kept columns; later over :math:`v = [\sigma'_1, \dots, \sigma'_{r_{old}},
  S_1, \dots, S_r]`, with :math:`\sigma'_i = \lVert m_i^\top R\rVert` the old
  column's energy in the new task's representations and :math:`S` the new
  columns' singular values of the residual; the old columns' importances
  become :math:`\mathrm{clip}(\lambda_i + \lambda'_i, 0, 1)` (they only
  grow), the new ones :math:`\lambda'`. Biases and norms (unprojected leaves
  with fewer than 2 axes) stop moving after the first task, as the code
  zeroes them. The basis lives in GPM's storage (static widths, no retrace);
  a step reads the first ``count`` columns rounded up to a static width.

  As the official code (sahagobinda/SGP ``main_sgp_cifar100.py``), the
  first task keeps :math:`\#\{k : \text{cum}_k < \epsilon\}` columns (GPM's
  ``official_rank=True``); later tasks add until the threshold is reached.

  Args:
    threshold: energy threshold :math:`\epsilon \in [0, 1]` (a ``threshold=``
      consolidate signal sets it per layer, as for ``gpm``).
    alpha: :math:`\alpha > 0` (``scale_coff``; 10 in the code's CIFAR-100 run).
    layers: the kernels to project, as :func:`cl_optax.gpm` (static).
    orientation: as :func:`cl_optax.gpm`.
    freeze_unprojected: as :func:`cl_optax.gpm`.
    basis_dtype: as :func:`cl_optax.gpm` (static).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Saha & Roy, *Continual learning with scaled gradient projection*, AAAI
    2023 (arXiv:2302.01386), Eq. 2-4; code sahagobinda/SGP
    (``main_sgp_cifar100.py`` ``update_SGP``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"kernel": jnp.zeros((3, 1))}
    >>> tx = cl_optax.sgp(threshold=0.99, alpha=1.0)
    >>> x = jnp.diag(jnp.array([2.0, 1.0, 0.5]))  # energies 4, 1, 0.25: keeps 2 (cum < 0.99)
    >>> state = cl_optax.consolidate(tx.init(params), params, representations={"kernel": x})
    >>> state.sgp_importance["kernel"]  # (a+1) s / (a s + max s) = 1, 2/3
    Array([1.       , 0.6666667, 0.       ], dtype=float32)
    >>> tx.update({"kernel": jnp.ones((3, 1))}, state)[0]["kernel"][:, 0]
    Array([0.       , 0.3333333, 1.       ], dtype=float32)
  """

  dtype = jnp.float32 if basis_dtype is None else basis_dtype
  _checks.check_hyperparameter(threshold, transform="sgp", name="threshold", low=0.0, high=1.0)
  _checks.check_hyperparameter(alpha, transform="sgp", name="alpha", low=0.0, open_low=True)

  def init_fn(params: optax.Params) -> SGPState:
    basis, count = projected_buffers(layers, params, dtype, orientation, "sgp")
    importance = _trees.map_unmasked(lambda b: jnp.zeros(b.shape[:1], jnp.float32), basis)
    return SGPState(
      sgp_basis=basis,
      sgp_count=count,
      sgp_importance=importance,
      sgp_tasks=jnp.zeros((), jnp.int32),
      sgp_threshold=jnp.asarray(threshold, jnp.float32),
      sgp_alpha=jnp.asarray(alpha, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args("sgp", extra_args)
    del params, extra_args
    state = cast(SGPState, state)
    _checks.check_updates(updates, state.sgp_basis, transform="sgp", shapes=False)
    frozen = state.sgp_tasks > 0

    def leaf(path, b, c, lam, u):
      if _trees.is_masked(u) or u is None:
        return u
      if _trees.is_masked(b):
        return freeze_leaf(u, frozen) if freeze_unprojected else u
      return project_leaf(path, b, c, u, orientation, lam)

    new_updates = jax.tree_util.tree_map_with_path(
      leaf, state.sgp_basis, state.sgp_count, state.sgp_importance, updates,
      is_leaf=_trees.is_masked,
    )  # fmt: skip
    return new_updates, state._replace(
      sgp_threshold=jnp.asarray(threshold, jnp.float32),
      sgp_alpha=jnp.asarray(alpha, jnp.float32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
