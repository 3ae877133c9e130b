"""GPM: gradient projection memory (Saha, Garg & Roy, 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._gpm_project import grow_basis, project_updates, projected_buffers
from cl_optax._gpm_signals import layer_signals


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
      nb, nc = grow_basis(b, c, x, thr, strict)
      new_b.append(nb)
      new_c.append(nc)
    return self._replace(
      feature_basis=_trees.replace_unmasked(self.feature_basis, new_b),
      feature_count=_trees.replace_unmasked(self.feature_count, new_c),
      gpm_tasks=self.gpm_tasks + 1,
    )


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
    new_updates = project_updates(
      updates,
      state.feature_basis,
      state.feature_count,
      state.gpm_tasks > 0,
      orientation=orientation,
      freeze_unprojected=freeze_unprojected,
    )
    return new_updates, state._replace(gpm_threshold=jnp.asarray(threshold, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
