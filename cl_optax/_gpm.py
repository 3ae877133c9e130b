"""GPM: gradient projection memory (Saha, Garg & Roy, 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _select, _trees
from cl_optax._gpm_project import append_columns, project_out, project_scaled
from cl_optax._gpm_signals import (
  by_path,
  checked_threshold,
  kernel_shapes,
  layer_inputs,
  representations_by_path,
  thresholds_by_path,
)


class GPMState(NamedTuple):
  """State of :func:`gpm`.

  Attributes:
    feature_basis: per projected leaf (a kernel ``[*in, out]``), an orthogonal
      ``[d_in, d_in]`` matrix (``d_in = prod(in)``) whose first
      ``feature_count`` columns are the protected basis :math:`M` and whose
      other columns span the rest of the input space, so the update projects
      through ``min(feature_count, d_in - feature_count)`` columns;
      ``optax.MaskedNode`` for leaves that are not projected.
    feature_count: per projected leaf, the number of basis columns (int32).
    gpm_tasks: number of consolidates so far (int32).
    gpm_threshold: the default energy threshold (float32), refreshed from the
      factory argument at every update.
    gpm_official_rank: bool, the official code's rank rule on the first task
      (see :func:`gpm`'s ``official_rank``).
  """

  TRANSFORM = "gpm"
  SIGNALS = ("representations", "threshold")
  EXTRA_ARGS = ()

  feature_basis: Any
  feature_count: Any
  gpm_tasks: jax.Array  # shape=(), int32
  gpm_threshold: jax.Array  # shape=(), float32
  gpm_official_rank: jax.Array  # shape=(), bool

  def consolidate(self, params: optax.Params, **signals: Any) -> GPMState:
    """Basis growth: extends every projected leaf's basis from the task's ``representations``."""
    inputs = layer_signals(self.feature_basis, params, signals, self.gpm_threshold, "gpm")
    strict = self.gpm_official_rank & (self.gpm_tasks == 0)
    new_b, new_c = [], []
    for (x, thr), b, c in zip(
      inputs,
      _trees.unmasked_leaves(self.feature_basis),
      _trees.unmasked_leaves(self.feature_count),
      strict=True,
    ):
      nb, nc = _gpm_grow(b, c, x, thr, strict)
      new_b.append(nb)
      new_c.append(nc)
    return self._replace(
      feature_basis=_trees.replace_unmasked(self.feature_basis, new_b),
      feature_count=_trees.replace_unmasked(self.feature_count, new_c),
      gpm_tasks=self.gpm_tasks + 1,
    )


def layer_signals(basis: Any, params: Any, signals: dict, default_threshold: Any, transform: str):
  """``[(inputs [n, d_in], threshold)]`` per projected leaf of ``basis`` (its unmasked leaves)."""
  reps = _checks.require_signal(
    signals,
    "representations",
    transform,
    "a pytree holding, at the path of each projected kernel leaf, the layer's "
    "input activations [n, d_in] at n samples of the task (for a convolution kernel, "
    "cl_optax.conv_representations(x, kernel.shape, ...))",
  )
  thresholds = signals.get("threshold")
  basis_paths = _trees.unmasked_key_strings(basis)
  unprojected = [p for p in _trees.key_strings(basis) if p not in basis_paths]
  aliases = dict(zip(_trees.leaf_paths(basis), _trees.key_strings(basis)))
  rep_by_path = representations_by_path(by_path(reps, aliases), basis_paths, unprojected)
  shapes = kernel_shapes(params)
  thr = None if thresholds is None else by_path(thresholds, aliases)
  thr_by_path = thresholds_by_path(thr, basis_paths)
  out = []
  for path, b in zip(basis_paths, _trees.unmasked_leaves(basis), strict=True):
    x = layer_inputs(path, rep_by_path[path], b.shape[0], shapes.get(path))
    t = checked_threshold(path, thr_by_path.get(path, default_threshold))
    out.append((x, jnp.asarray(t, jnp.float32)))
  return out


# ------------------------------------------------------------ basis growth


@jax.jit
def _gpm_grow(basis, count, x, threshold, strict=False):
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


# -------------------------------------------------------------- projection


def _project_leaf(
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


def _freeze_leaf(u: Any, frozen: jax.Array) -> Any:
  """An unprojected leaf's update: zeros (finite entries) once ``frozen`` if it has fewer
  than 2 dimensions (a bias, a norm scale); an unprojected kernel passes unchanged."""
  return jax.tree.map(
    lambda x: jnp.where(frozen & jnp.isfinite(x), jnp.zeros_like(x), x) if jnp.ndim(x) < 2 else x,
    u,
  )


# ------------------------------------------------------------------- init


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


def gpm(
  threshold: float = 0.97,
  *,
  layers: Any | Callable[[Any], Any] | None = None,
  orientation: str | None = None,
  freeze_unprojected: bool = True,
  basis_dtype: Any = None,
  official_rank: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""GPM: gradient projection memory (Saha, Garg & Roy, 2021).

  For each projected layer :math:`l` it keeps an orthonormal basis
  :math:`M_l` of the part of its *input space* that past tasks used, and
  removes that part from the kernel's gradient. The projection acts on the
  kernel's input axes (Flax ``[in, out]``; all axes but the last for a conv
  kernel ``[kh, kw, in, out]``, flattened as ``kernel.reshape(-1, out)``):

  .. math::
    \nabla W_l \leftarrow \nabla W_l - M_l M_l^\top \nabla W_l .

  :func:`cl_optax.consolidate` with ``representations=`` (at the path of each
  projected kernel, that layer's inputs ``[n, d_in]`` at ``n`` samples of the
  finished task) grows the bases. For a convolution kernel (3 or more axes,
  ``(*window, c_in, c_out)``) the representations are its input patches,
  ``cl_optax.conv_representations(x, kernel.shape, strides=..., padding=...,
  dilation=...)`` of the layer's inputs ``x`` ``[n, h, w, c_in]``: rows of
  ``kh * kw * c_in`` features in the order of ``kernel.reshape(-1, c_out)``'s
  rows. Such a kernel takes only that typed result, built for its own shape
  (read from ``params``): a plain array is refused, because patches in another
  order (``jax.lax.conv_general_dilated_patches`` gives ``(c_in, kh, kw)``)
  have the same width and would protect the wrong subspace. With
  :math:`R_l = X_l^\top` and
  :math:`\hat R_l = R_l - M_l M_l^\top R_l` (Eq. 8), the top left singular
  vectors of :math:`\hat R_l` are added until the captured energy reaches
  ``threshold`` (Eq. 5 and 9). An optional ``threshold=`` signal (a tree like
  ``representations`` of floats) sets per-layer thresholds. Unprojected leaves
  with fewer than 2 dimensions (biases, norm scales) get a zero update from
  the first consolidate on when ``freeze_unprojected``, as the official code
  zeroes the gradients of 1-D parameters from the second task on; an
  unprojected kernel (2 or more dimensions, one that ``layers=`` leaves out,
  e.g. the task heads) keeps training, as the official code's heads do.
  ``docs/projection.md``
  describes the basis buffer and its cost and maps a Flax model's layer inputs
  to ``representations``.

  Departures from the official code: the first task keeps the smallest ``k``
  that reaches the threshold (Eq. 5); the official code keeps one column fewer
  there, :math:`\#\{k : \text{cum}_k < \epsilon_{th}\}` (``main_pmnist.py``
  ``update_GPM``, task 0), which ``official_rank=True`` reproduces (later tasks
  add until the threshold is reached in both). A kernel update holding a
  non-finite entry passes unchanged (the projection would spread it over the kernel).

  Args:
    threshold: energy threshold :math:`\epsilon_{th} \in [0, 1]`.
    layers: the kernels to project: a selector over parameter paths
      (``docs/selectors.md``: ``"l1"``, ``["l1", "l2"]``, ``"*/kernel"``, a
      compiled regex or a ``(path, leaf) -> bool`` callable; of the leaves it
      selects, those with 2 or more axes are projected), or, as before,
      ``optax.masked``-style labels (a pytree of bools like params, or a
      function ``params -> bools``). Default: every non-empty leaf with 2 or
      more dimensions. With ``optax.inject_hyperparams`` pass it in
      ``static_args``.
    orientation: ``"in_out"`` (Flax: input axes first, the output axis last),
      ``"out_in"`` (Equinox / PyTorch ``weight [out, in]``, projected as its
      transpose; 2-D only) or ``None``: a leaf named ``weight`` is
      ``"out_in"`` (refused when square: declare it), any other ``"in_out"``.
      The representations are the layer's inputs ``[n, in]`` either way.
    freeze_unprojected: whether the unprojected leaves with fewer than 2
      dimensions (biases, norm scales) stop moving after the first task.
      Unprojected kernels always train; to leave a layer out entirely (its
      bias too), wrap: ``optax.masked(gpm(...), labels)``.
    basis_dtype: storage dtype of the ``[d_in, d_in]`` basis buffers (float32
      when ``None``; growth and projection compute in float32, and
      ``jnp.bfloat16`` halves the largest state at about three significant
      digits of orthogonality). Under ``optax.inject_hyperparams`` list it in
      ``static_args``.
    official_rank: the official code's rank rule on the first task (one
      column fewer per layer); static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state's ``consolidate``
    raises a ``ValueError`` naming the leaf for representations of the wrong
    width, at a path that is not projected, or, at a convolution kernel, not
    built by :func:`cl_optax.conv_representations` for that kernel's shape.

  References:
    Saha, Garg, Roy, *Gradient Projection Memory for Continual Learning*,
    ICLR 2021 (arXiv:2103.09762), Eq. 5, 8, 9 and Sec. 4 (conv layers: the
    patches, App. C); official code sahagobinda/GPM (``main_pmnist.py``
    ``update_GPM``; ``main_cifar100.py`` ``get_representation_matrix``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"kernel": jnp.zeros((3, 2))}
    >>> tx = optax.chain(cl_optax.gpm(threshold=0.99), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> x = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # inputs seen: span(e1)
    >>> state = cl_optax.consolidate(state, params, representations={"kernel": x})
    >>> tx.update({"kernel": jnp.ones((3, 2))}, state, params)[0]["kernel"]
    Array([[-0., -0.],
           [-1., -1.],
           [-1., -1.]], dtype=float32)

    A convolution (NHWC inputs, HWIO kernel): its patches, at full energy,
    protect every input patch the layer saw.

    >>> import jax
    >>> params = {"conv": jnp.zeros((3, 3, 2, 4))}
    >>> tx = cl_optax.gpm(threshold=1.0)
    >>> x = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))  # one 3x3 input
    >>> reps = cl_optax.conv_representations(x, params["conv"].shape, padding="VALID")
    >>> reps.patches.shape  # one position, kh * kw * c_in features
    (1, 18)
    >>> state = cl_optax.consolidate(tx.init(params), params, representations={"conv": reps})
    >>> g = jnp.einsum("f,o->fo", reps.patches[0], jnp.ones(4)).reshape(3, 3, 2, 4)
    >>> float(jnp.abs(tx.update({"conv": g}, state)[0]["conv"]).max()) < 1e-5
    True
  """

  dtype = jnp.float32 if basis_dtype is None else basis_dtype

  _checks.check_hyperparameter(threshold, transform="gpm", name="threshold", low=0.0, high=1.0)

  def init_fn(params: optax.Params) -> GPMState:
    basis, count = projected_buffers(layers, params, dtype, orientation, "gpm")
    return GPMState(
      feature_basis=basis,
      feature_count=count,
      gpm_tasks=jnp.zeros((), jnp.int32),
      gpm_threshold=jnp.asarray(threshold, jnp.float32),
      gpm_official_rank=jnp.asarray(official_rank),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("gpm", extra_args)
    del params, extra_args
    state = cast(GPMState, state)
    _checks.check_updates(updates, state.feature_basis, transform="gpm", shapes=False)
    frozen = state.gpm_tasks > 0

    def leaf(path, b, c, u):
      if _trees.is_masked(u) or u is None:
        return u
      if _trees.is_masked(b):
        return _freeze_leaf(u, frozen) if freeze_unprojected else u
      return _project_leaf(path, b, c, u, orientation)

    new_updates = jax.tree_util.tree_map_with_path(
      leaf, state.feature_basis, state.feature_count, updates, is_leaf=_trees.is_masked
    )
    return new_updates, state._replace(gpm_threshold=jnp.asarray(threshold, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
