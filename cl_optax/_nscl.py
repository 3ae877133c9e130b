r"""Adam-NSCL: the update projected onto the null space of the old inputs' covariance."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._gpm_project import freeze_leaf, project_kernel, project_out, projected_buffers
from cl_optax._gpm_signals import layer_signals


class NSCLState(NamedTuple):
  """State of :func:`nscl`.

  Attributes:
    nscl_covariance: per projected kernel, the running (never reset) uncentred
      covariance :math:`C = \\sum x x^\\top` ``[d_in, d_in]`` of the layer's
      inputs over all finished tasks (float32); ``optax.MaskedNode`` elsewhere.
    nscl_basis: per projected kernel, the covariance's eigenvectors
      ``[d_in, d_in]`` by descending eigenvalue: the first ``nscl_count``
      columns span its range, the other :math:`k_0` its null space :math:`U_0`
      (zeros before the first consolidate).
    nscl_count: per projected kernel, :math:`d_{in} - k_0` (int32; 0, no
      projection, before the first consolidate).
    nscl_tasks: number of consolidates so far (int32).
    nscl_a: :math:`a`, the null-space threshold factor (refreshed at every update).
  """

  TRANSFORM = "nscl"
  SIGNALS = ("representations",)
  EXTRA_ARGS = ()

  nscl_covariance: Any
  nscl_basis: Any
  nscl_count: Any
  nscl_tasks: jax.Array  # shape=(), int32
  nscl_a: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> NSCLState:
    """Adds the task's ``representations`` to the covariance and recomputes the projectors."""
    signals = {k: v for k, v in signals.items() if k != "threshold"}
    inputs = layer_signals(self.nscl_covariance, params, signals, 0.0, "nscl")
    new = [
      _nscl_grow(c, x, self.nscl_a)
      for (x, _), c in zip(inputs, _trees.unmasked_leaves(self.nscl_covariance), strict=True)
    ]
    return self._replace(
      nscl_covariance=_trees.replace_unmasked(self.nscl_covariance, [n[0] for n in new]),
      nscl_basis=_trees.replace_unmasked(self.nscl_basis, [n[1] for n in new]),
      nscl_count=_trees.replace_unmasked(self.nscl_count, [n[2] for n in new]),
      nscl_tasks=self.nscl_tasks + 1,
    )


def null_space_projector(covariance, a=10.0, normalize=True):
  r"""Adam-NSCL's projector onto the approximate null space of ``covariance``.

  The eigenvectors :math:`U_0` of ``covariance`` ``[d, d]`` whose eigenvalue is
  at most :math:`a \cdot \max(\lambda_{min}, d\,\epsilon_{32}\lambda_{max})`;
  returns :math:`U_0 U_0^\top` (``normalize=False``) or
  :math:`U_0 U_0^\top / \lVert U_0 U_0^\top \rVert_F = U_0 U_0^\top / \sqrt{k_0}`
  (``normalize=True``, the official code), and :math:`k_0`. The floor
  :math:`d\,\epsilon_{32}\lambda_{max}` (numpy's ``matrix_rank`` tolerance) stands
  in for :math:`\lambda_{min}` when the covariance is rank-deficient: float32
  ``eigh`` returns its zero eigenvalues as noise of either sign, and
  :math:`a` times a noise value (or a negative one) would keep an arbitrary part
  of the exact null space, or none of it.
  """
  vec, k0 = _null_space(covariance, a)
  u0 = jnp.where(jnp.arange(vec.shape[0])[None, :] < k0, vec, 0.0)
  proj = u0 @ u0.T
  scale = jnp.where(normalize, jax.lax.rsqrt(jnp.maximum(k0, 1).astype(jnp.float32)), 1.0)
  return proj * scale, k0


def _null_space(covariance, a):
  """The eigenvectors of ``covariance`` in ascending order and the null-space size ``k0``."""
  c = jnp.asarray(covariance, jnp.float32)
  d = c.shape[0]
  lam, vec = jnp.linalg.eigh((c + c.T) / 2)  # ascending
  floor = d * float(np.finfo(np.float32).eps) * jnp.maximum(lam[-1], 0.0)
  k0 = jnp.sum(lam <= a * jnp.maximum(lam[0], floor)).astype(jnp.int32)
  return vec, k0


@jax.jit
def _nscl_grow(covariance, x, a):
  """``C + X^T X``, its eigenvectors in descending order and the range size ``d - k0``.

  The null space is the last ``k0`` columns, so ``U_0 U_0^T g = g - M M^T g`` for the
  first ``d - k0`` (GPM's :func:`~cl_optax._gpm_project.project_out` of those columns).
  """
  c = covariance + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
  vec, k0 = _null_space(c, a)
  return c, vec[:, ::-1], c.shape[0] - k0


def nscl_batch_means(x: Any, batch_size: int) -> jax.Array:
  """The means of consecutive batches of ``batch_size`` rows of ``x`` ``[n, ...]``.

  Passed to :func:`nscl` as ``representations=`` they give the official code's
  covariance :math:`\\sum_b \\bar x_b \\bar x_b^\\top` (one batch-mean input per
  training batch). For a convolution take the batch means of its input images
  ``[n, h, w, c]`` and then ``cl_optax.conv_representations`` of them, as the
  code unfolds the batch-mean image. A last partial batch is dropped.
  """
  x = jnp.asarray(x)
  if int(batch_size) < 1 or np.ndim(x) < 1 or x.shape[0] < int(batch_size):
    raise ValueError(
      f"nscl_batch_means: expected batch_size >= 1 and inputs [n, ...] with n >= batch_size; "
      f"got batch_size={batch_size} and shape {np.shape(x)}."
    )
  n = x.shape[0] // int(batch_size) * int(batch_size)
  return jnp.mean(x[:n].reshape(-1, int(batch_size), *x.shape[1:]), axis=1)


def nscl(
  a: float = 10.0,
  *,
  normalize: bool = True,
  layers: Any = None,
  orientation: str | None = None,
  freeze_unprojected: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam-NSCL: the update in the null space of the old inputs (Wang et al., CVPR 2021).

  Placed **after** the base optimiser, ``optax.chain(optax.adam(lr), nscl())``:
  each projected kernel's update :math:`u` (Adam's, from the raw gradient's
  moments) is mapped through the projector onto the approximate null space of
  the uncentred covariance :math:`C` of that layer's inputs over all previous
  tasks, so the layer's outputs on old inputs barely move:

  .. math::
    u \leftarrow P u, \qquad P = U_0 U_0^\top / \lVert U_0 U_0^\top \rVert_F,
    \qquad U_0 = \{u_j : \lambda_j(C) \le a\,\lambda_{min}(C)\}

  (Flax ``[in, out]`` kernels: ``P`` acts on the input axes; a conv kernel as
  ``kernel.reshape(-1, out)``). ``cl_optax.consolidate(state, params,
  representations=...)`` adds :math:`X^\top X` of each layer's inputs ``X``
  ``[n, d_in]`` (at the path of its kernel, as for :func:`cl_optax.gpm`) to
  the running covariance, which is never reset, and recomputes its null space by
  ``eigh``. A step projects through GPM's static-width code
  (:func:`cl_optax.gpm`): :math:`U_0U_0^\top u = u - MM^\top u` with :math:`M`
  the covariance's range, through whichever of :math:`M` or :math:`U_0` has
  fewer columns (no ``[d_in, d_in]`` product when either is narrow).
  Per-sample rows give the paper's :math:`\bar X^\top \bar X` (up to a scale,
  which the relative rule ignores); :func:`cl_optax.nscl_batch_means` of the
  task's inputs gives the official code's sum of batch-mean outer products. A
  convolution takes ``cl_optax.conv_representations`` (patches in the
  kernel's ``(*window, c_in)`` order). Before the first consolidate ``P = I``
  (no projection on the first task, as in the code).

  ``normalize=True`` (the default) is the code's projector
  (``optim/adam_svd.py``): :math:`\lVert U_0U_0^\top\rVert_F = \sqrt{k_0}`, so
  it divides each layer's step by the square root of its null-space size
  :math:`k_0`, an effective learning rate that depends on the layer's width
  and on :math:`a`. It is the default because the published runs and their
  learning rates (``svd_lr`` 5e-5) were made with it; ``normalize=False`` is
  the plain projector :math:`U_0 U_0^\top` of the paper's equations, whose
  step size does not depend on :math:`k_0`.

  Departures from the official code: float32 rank deficiency (an input pixel
  that is always 0, as MNIST's borders, makes :math:`\lambda_{min} = 0`, which
  ``eigh`` returns as noise of either sign) is handled by flooring
  :math:`\lambda_{min}` at :math:`d_{in}\,\epsilon_{32}\,\lambda_{max}`
  (numpy's rank tolerance) before the factor :math:`a`
  (:func:`cl_optax.null_space_projector`); the code's SVD in float32 thresholds at
  :math:`a` times its noise. The code's BN parameters (an EWC penalty) and
  weight decay are not part of this transform (chain :func:`cl_optax.ewc`,
  ``optax.add_decayed_weights``). A kernel update holding a non-finite entry
  passes unchanged.

  Args:
    a: the null-space factor :math:`a \ge 1` (``svd_thres``; 10 in the code's
      CIFAR-100 10-split and TinyImageNet runs, 30 in the 20-split).
    normalize: the code's Frobenius normalisation of the projector (see above).
    layers: the kernels to project, as :func:`cl_optax.gpm` (static; default
      every leaf with 2 or more axes; leave the task heads out as the code does).
    orientation: as :func:`cl_optax.gpm`.
    freeze_unprojected: whether unprojected leaves with fewer than 2 axes
      (biases, norm scales) get a zero update after the first consolidate; the
      code has no rule for biases (its convolutions have none), so the default
      lets them train.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Wang, Li, Sun, Xu, *Training Networks in Null Space of Feature Covariance
    for Continual Learning*, CVPR 2021 (arXiv:2103.07113), Sec. 3; code
    ShipengWang/Adam-NSCL (``svd_agent/svd_based.py``, ``optim/adam_svd.py``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"kernel": jnp.zeros((3, 1))}
    >>> tx = optax.chain(optax.sgd(1.0), cl_optax.nscl(10.0, normalize=False))
    >>> state = tx.init(params)
    >>> x = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # inputs span e1, e2
    >>> state = cl_optax.consolidate(state, params, representations={"kernel": x})
    >>> tx.update({"kernel": jnp.ones((3, 1))}, state, params)[0]["kernel"][:, 0]
    Array([-0., -0., -1.], dtype=float32)
  """

  _checks.check_hyperparameter(a, transform="nscl", name="a", low=1.0)

  def init_fn(params: optax.Params) -> NSCLState:
    basis, count = projected_buffers(layers, params, jnp.float32, orientation, "nscl")
    return NSCLState(
      nscl_covariance=_trees.map_unmasked(lambda b: jnp.zeros(b.shape, b.dtype), basis),
      nscl_basis=basis,
      nscl_count=count,
      nscl_tasks=jnp.zeros((), jnp.int32),
      nscl_a=jnp.asarray(a, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args("nscl", extra_args)
    del params, extra_args
    state = cast(NSCLState, state)
    _checks.check_updates(updates, state.nscl_basis, transform="nscl", shapes=False)
    frozen = state.nscl_tasks > 0
    scaled = frozen & jnp.asarray(normalize)

    def leaf(path, b, c, u):
      if _trees.is_masked(u) or u is None:
        return u
      if _trees.is_masked(b):
        return freeze_leaf(u, frozen) if freeze_unprojected else u
      d_in = b.shape[0]
      # U0 U0^T g = g - M M^T g through the range M (or U0 itself, the fewer columns)
      scale = jnp.where(scaled, jax.lax.rsqrt(jnp.maximum(d_in - c, 1).astype(jnp.float32)), 1.0)
      project = lambda g: scale * project_out(b, c, g)  # noqa: E731
      return project_kernel(path, d_in, u, orientation, project, "nscl")

    new_updates = jax.tree_util.tree_map_with_path(
      leaf, state.nscl_basis, state.nscl_count, updates, is_leaf=_trees.is_masked
    )
    return new_updates, state._replace(nscl_a=jnp.asarray(a, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
