"""Natural continual learning: :func:`ncl`, precision-preconditioned trust-region steps."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._kron import (
  NCLKron,
  StepCoefficients,
  StepLeaves,
  check_factors,
  damped_inverses,
  init_kron,
  is_factors,
  kron_directions,
  kron_layout,
  leaf_names,
  lookup_factors,
  nearest_kron_sum,
  prior_diagonal,
)
from cl_optax._select import Selector


class NCLState(NamedTuple):
  """State of :func:`ncl`.

  Attributes:
    prior_mean: :math:`\\mu`, like params (zeros before the first consolidate,
      or the initial params with ``prior_mean="init"``).
    prior_precision: diagonal :math:`\\Lambda`, like params; ``MaskedNode`` at
      the leaves of Kronecker-factored layers.
    kron: ``{layer name: NCLKron}`` for ``precision="kfac"`` (empty for diag).
    ncl_damping: :math:`\\alpha` the Kronecker inverses were (or will be) built
      with; refreshed from the factory argument at every update so that a
      value set through ``optax.inject_hyperparams`` reaches ``consolidate``.
    ncl_decay: :math:`\\gamma` of the prior update, refreshed the same way.
  """

  TRANSFORM = "ncl"
  SIGNALS = ("precision",)
  EXTRA_ARGS = ()

  prior_mean: Any
  prior_precision: Any
  kron: dict
  ncl_damping: jax.Array  # shape=(), float32
  ncl_decay: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> NCLState:
    """New prior = posterior: ``mu <- params``, ``Lambda <- decay * Lambda + F``."""
    new = _checks.require_signal(
      signals,
      "precision",
      "ncl",
      "a diagonal Fisher like params (importance.fisher_diag) or, with "
      "precision='kfac', {layer: KronFactors} (importance.kfac_factors)",
    )
    mean = _trees.restrict_like(self.prior_mean, params, transform="ncl", name="params")
    mean = jax.tree.map(
      lambda m, p: m if _trees.is_masked(m) else _trees.fresh(p, m.dtype),
      self.prior_mean,
      mean,
      is_leaf=_trees.is_masked,
    )
    decay = self.ncl_decay
    if self.kron:
      kron = {}
      for name, old in self.kron.items():
        a_new, g_new = check_factors(name, lookup_factors(new, name), old)
        a, g = nearest_kron_sum(decay * old.a, old.g, a_new, g_new)
        a_inv, g_inv = damped_inverses(a, g, self.ncl_damping)
        kron[name] = NCLKron(a, g, a_inv, g_inv)
      return self._replace(prior_mean=mean, kron=kron, prior_precision=self._diag_outside(new))
    if not _trees.unmasked_leaves(self.prior_precision):  # nothing selected: nothing to merge
      return self._replace(prior_mean=mean)
    new = _checks.validated_signal(
      signals, "precision", self.prior_precision, transform="ncl", values="nonnegative"
    )
    precision = jax.tree.map(
      lambda old, f: (
        old
        if _trees.is_masked(old)
        else (decay * old.astype(jnp.float32) + jnp.asarray(f, jnp.float32)).astype(old.dtype)
      ),
      self.prior_precision,
      new,
      is_leaf=_trees.is_masked,
    )
    return self._replace(prior_mean=mean, prior_precision=precision)

  def _diag_outside(self, new: Any) -> Any:
    """Kronecker mode: merges the diagonal leaves (parameters outside the layers)."""
    leaves, treedef = jax.tree.flatten(self.prior_precision, is_leaf=_trees.is_masked)
    if all(_trees.is_masked(x) for x in leaves):
      return self.prior_precision
    signal = dict(
      zip(
        leaf_names(new),
        jax.tree.leaves(new, is_leaf=lambda x: _trees.is_masked(x) or is_factors(x)),
      )
    )
    out = []
    for name, old in zip(leaf_names(self.prior_precision), leaves):
      if _trees.is_masked(old):
        out.append(old)
        continue
      if name not in signal or is_factors(signal[name]):
        raise ValueError(
          f"ncl: `precision` has no diagonal leaf {name!r}: with precision='kfac', "
          "parameters outside `layers` need a diagonal precision (e.g. from "
          "importance.fisher_diag) at their path in the same tree."
        )
      x = jnp.asarray(signal[name], jnp.float32)
      if x.shape != old.shape:
        raise ValueError(
          f"ncl: `precision` leaf {name!r} has shape {x.shape}; expected {old.shape}."
        )
      _checks.check_nonnegative({name: x}, transform="ncl", name="precision")
      out.append((self.ncl_decay * old.astype(jnp.float32) + x).astype(old.dtype))
    return treedef.unflatten(out)


def _check_arguments(
  data_size: float,
  strength: float,
  damping: float,
  decay: float,
  radius: float | None,
  precision: str,
  layers: Any,
  prior_mean: str,
) -> None:
  """Raises a ``ValueError`` for an option or hyperparameter :func:`ncl` does not take."""
  if precision not in ("diag", "kfac"):
    raise ValueError(f"ncl: `precision` must be 'diag' or 'kfac'; got {precision!r}.")
  if prior_mean not in ("zeros", "init"):
    raise ValueError(f"ncl: `prior_mean` must be 'zeros' or 'init'; got {prior_mean!r}.")
  if precision == "kfac" and not layers:
    raise ValueError(
      "ncl: precision='kfac' needs `layers=`, a selector of the dense layers "
      "(e.g. ['l1', 'l2'] or 'layers/*'; docs/selectors.md)."
    )
  if precision == "diag" and layers:
    raise ValueError("ncl: `layers=` is only used with precision='kfac'.")
  for arg, value, low, open_low in (
    ("data_size", data_size, 0.0, True),
    ("strength", strength, 0.0, False),
    ("damping", damping, 0.0, False),
    ("radius", radius, 0.0, True),
  ):
    _checks.check_hyperparameter(value, transform="ncl", name=arg, low=low, open_low=open_low)
  _checks.check_hyperparameter(decay, transform="ncl", name="decay", low=0.0, high=1.0)


# ------------------------------------------------------------------- init


def _init_mean(params: optax.Params, prior_mean: str) -> optax.Params:
  """:math:`\\mu_0`: zeros, or a float32 copy of the initial params."""
  if prior_mean == "zeros":
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
  return jax.tree.map(lambda p: _trees.fresh(p, jnp.float32), params)


def _init_diag(params: optax.Params, n: jax.Array, dtype: Any) -> optax.Params:
  """Diagonal precision: :math:`\\Lambda_0 = I / N` like params."""
  return jax.tree.map(lambda p: prior_diagonal(p, n, dtype), params)


# --------------------------------------------------------------- direction


def _state_leaves(params: optax.Params, state: NCLState, count: int) -> tuple[list, list, list]:
  """The leaves of params, prior mean and precision, checked to number ``count``."""
  p_leaves = jax.tree.leaves(params, is_leaf=_trees.is_masked)
  m_leaves = jax.tree.leaves(state.prior_mean, is_leaf=_trees.is_masked)
  f_leaves = jax.tree.leaves(state.prior_precision, is_leaf=_trees.is_masked)
  if not (count == len(p_leaves) == len(m_leaves) == len(f_leaves)):
    raise ValueError(
      f"ncl: updates/params do not match the state: {count} update leaves, "
      f"{len(p_leaves)} params leaves, {len(m_leaves)} state leaves."
    )
  return p_leaves, m_leaves, f_leaves


def _diag_directions(leaves: StepLeaves, c: StepCoefficients) -> tuple[list, list[jax.Array]]:
  """:math:`\\delta` at the diagonal leaves (others as given), and their squared
  :math:`\\Lambda`-norms (non-finite entries excluded) when ``c.with_norm``.
  """
  out, sq_norms = list(leaves.updates), []
  for i, (u, p, m, f) in enumerate(zip(*leaves)):
    if _trees.is_masked(u) or _trees.is_masked(f) or u is None:
      continue
    g = u.astype(jnp.float32)
    f = f.astype(jnp.float32)
    diff = jnp.asarray(p, jnp.float32) - m
    if c.precondition_penalty:
      d = (g + c.lam * f * diff) / (f + c.alpha2)
    else:
      d = g / (f + c.alpha2) + c.lam * diff
    out[i] = d = d / c.n
    if c.with_norm:
      sq_norms.append(jnp.sum(jnp.where(jnp.isfinite(d), f * jnp.square(d), 0.0)))
  return out, sq_norms


def _clip_to_radius(out: list, sq_norm: jax.Array, radius: float) -> list:
  """The radius clip :math:`\\delta \\min(1, r / \\|\\delta\\|_\\Lambda)`: then
  :math:`\\|\\delta\\|_\\Lambda \\le r`.
  """
  r = jnp.asarray(radius, jnp.float32)
  norm = jnp.sqrt(sq_norm)
  scale = jnp.where(norm > r, r / jnp.where(norm > 0, norm, 1.0), 1.0)
  return [o if _trees.is_masked(o) or o is None else o * scale for o in out]


def _finish(u: Any, d: Any) -> Any:
  """The direction in the update's dtype; non-finite update entries pass unchanged."""
  if _trees.is_masked(u) or u is None:
    return u
  return jnp.where(jnp.isfinite(u), d, u.astype(jnp.float32)).astype(u.dtype)


def _coefficients(
  damping: Any, strength: Any, data_size: Any, precondition_penalty: bool, radius: Any
) -> StepCoefficients:
  """The scalars of one :func:`ncl` step (``radius`` only says whether the norm is needed)."""
  return StepCoefficients(
    alpha2=jnp.square(jnp.asarray(damping, jnp.float32)),
    lam=jnp.asarray(strength, jnp.float32),
    n=jnp.asarray(data_size, jnp.float32),
    precondition_penalty=precondition_penalty,
    with_norm=radius is not None,
  )


def ncl(
  data_size: float,
  *,
  strength: float = 1.0,
  damping: float = 1e-3,
  decay: float = 1.0,
  radius: float | None = None,
  precision: str = "diag",
  layers: Selector | None = None,
  orientation: str | None = None,
  prior_mean: str = "zeros",
  precondition_penalty: bool = False,
  precision_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Natural continual learning (Kao et al., 2021): precision-preconditioned steps.

  The output direction (to be followed by ``optax.sgd`` / ``optax.scale``) is

  .. math::
    \delta = \frac{1}{N}\left[(\Lambda + \alpha^2 I)^{-1} g
             + \lambda\,(\theta - \mu)\right]

  with prior mean :math:`\mu` and precision :math:`\Lambda` of the tasks so
  far (per data point), :math:`\alpha` = ``damping``, :math:`\lambda` =
  ``strength`` and :math:`N` = ``data_size`` (the paper's Eq. 9-10).
  ``precondition_penalty=True`` preconditions the whole regularised gradient,
  :math:`\frac{1}{N}(\Lambda+\alpha^2 I)^{-1}(g + \lambda\Lambda(\theta-\mu))`,
  as both official codes do. With ``radius=r`` the direction is clipped to the
  trust region, :math:`\delta \leftarrow \delta \min(1, r / \|\delta\|_\Lambda)`.

  ``precision="diag"``: :math:`\Lambda` is a pytree like params.
  ``precision="kfac"``: :math:`\Lambda \approx A \otimes G` for each of
  ``layers`` (dense: a Flax ``kernel [in, out]`` or an Equinox ``weight [out,
  in]``, and a ``bias [out]``, the bias a homogeneous input coordinate), and
  a step costs two matmuls, :math:`A_s^{-1}\,\bar g\,G_s^{-1}` with
  :math:`A_s = A + \tfrac{\alpha}{\pi}I`, :math:`G_s = G + \alpha\pi I`
  inverted once per task; parameters outside the layers keep a diagonal
  precision. From :math:`\Lambda_0 = I/N` (:math:`A_0 = G_0 = I/\sqrt N`)
  and :math:`\mu_0 = 0`, ``cl_optax.consolidate(state, params,
  precision=F_k)`` sets :math:`\mu \leftarrow \theta` and
  :math:`\Lambda_k = \gamma\Lambda_{k-1} + F_k`. ``docs/precision.md``
  derives the step, gives the form of the Kronecker ``precision=`` signal
  and walks through a Flax model; ``docs/selectors.md`` the layer selector.

  Departures from the official code: the Kronecker prior sum is
  re-approximated by one product with the trace heuristic (van de Ven's
  ``additive_nearest_kf``; tachukao/ncl fits a KL-optimal product by
  fixed-point iteration); damped eigenvalues get a relative floor of 1e-9, so
  a singular factor never gives an infinite inverse; momentum, if wanted,
  comes from the following ``sgd`` (the official RNN code applies it before
  the preconditioner, the same linear map within a task). A change of
  ``damping`` through ``inject_hyperparams`` reaches the Kronecker inverses at
  the next ``consolidate`` (diagonal: at once). Non-finite gradient entries
  pass through unchanged, and so does the whole gradient of a Kronecker layer
  (kernel and bias) holding one; both stay out of the trust-region norm.

  Args:
    data_size: :math:`N`, the number of training examples per task (official
      defaults: 60000 permuted MNIST, 12000 split MNIST).
    strength: :math:`\lambda`, weight of the pull to the prior mean.
    damping: :math:`\alpha` (the paper tunes it: :math:`\alpha\to\infty` is
      K-FAC-Laplace / EWC-like, :math:`\alpha\to 0` full NCL).
    decay: :math:`\gamma` of the prior update (1 = no forgetting).
    radius: optional trust-region radius :math:`r` in the :math:`\Lambda`-norm.
    precision: ``"diag"`` or ``"kfac"``.
    layers: with ``"kfac"``, a layer selector (``docs/selectors.md``): layer
      paths such as ``["l1", "l2"]``, a glob ``"layers/*"``, a compiled regex
      or a ``(path, leaf) -> bool`` callable; the state and the
      ``precision=`` signal are keyed by the layer paths.
    orientation: with ``"kfac"``, ``"in_out"`` (Flax), ``"out_in"``
      (Equinox) or ``None`` (a ``kernel`` is ``"in_out"``, a non-square
      ``weight`` ``"out_in"``, a square ``weight`` is refused).
    prior_mean: ``"zeros"`` (official) or ``"init"``.
    precondition_penalty: precondition the pull too (official codes), see above.
    precision_dtype: storage dtype of the diagonal precision (float32 when
      ``None``; ``jnp.bfloat16`` halves its memory and traffic; the prior mean
      and the Kronecker factors stay float32). Under
      ``optax.inject_hyperparams`` list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Kao, Jensen, van de Ven, Bernacchia, Hennequin, *Natural continual
    learning: success is a journey, not (just) a destination*, NeurIPS 2021
    (arXiv:2106.08085), Sec. 3; code tachukao/ncl ``learners/laplace.py``
    (``NCL``), GMvandeVen/continual-learning ``--ncl``
    (``models/classifier.py``, ``models/utils/ncl.py``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(cl_optax.ncl(data_size=1.0, damping=0.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(
    ...     state, params, precision={"w": jnp.array([1.0, 3.0, 7.0])})
    >>> tx.update({"w": jnp.ones(3)}, state, params)[0]["w"]  # -(g / (1 + F))
    Array([-0.5  , -0.25 , -0.125], dtype=float32)
  """
  _check_arguments(data_size, strength, damping, decay, radius, precision, layers, prior_mean)
  prec_dtype = jnp.float32 if precision_dtype is None else precision_dtype

  def init_fn(params: optax.Params) -> NCLState:
    n = jnp.asarray(data_size, jnp.float32)
    if precision == "kfac":
      kron, prec = init_kron(params, (layers, orientation), n, damping, prec_dtype)
    else:
      kron, prec = {}, _init_diag(params, n, prec_dtype)
    return NCLState(
      prior_mean=_init_mean(params, prior_mean),
      prior_precision=prec,
      kron=kron,
      ncl_damping=jnp.asarray(damping, jnp.float32),
      ncl_decay=jnp.asarray(decay, jnp.float32),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("ncl", extra_args)
    del extra_args
    state = cast(NCLState, state)
    if params is None:
      raise ValueError("ncl: update needs `params` (the pull to the prior mean uses them).")
    coef = _coefficients(damping, strength, data_size, precondition_penalty, radius)
    _checks.check_updates(updates, state.prior_mean, transform="ncl")
    _checks.check_updates(params, state.prior_mean, transform="ncl", name="params")
    u_leaves, treedef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)
    leaves = StepLeaves(u_leaves, *_state_leaves(params, state, len(u_leaves)))
    out, sq_norms = _diag_directions(leaves, coef)
    if state.kron:
      sq_norms += kron_directions(
        out, leaves, state.kron, kron_layout(updates, layers, orientation), coef
      )
    if radius is not None:
      out = _clip_to_radius(out, sum(sq_norms, start=jnp.zeros((), jnp.float32)), radius)
    new = treedef.unflatten([_finish(u, d) for u, d in zip(u_leaves, out)])
    state = state._replace(
      ncl_damping=jnp.asarray(damping, jnp.float32), ncl_decay=jnp.asarray(decay, jnp.float32)
    )
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
