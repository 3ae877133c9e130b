"""Natural continual learning: :func:`ncl`, precision-preconditioned trust-region steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _trees
from cl_optax._kron import (
  NCLKron,
  check_factors,
  damped_inverses,
  is_factors,
  leaf_names,
  leaf_roles,
  lookup_factors,
  nearest_kron_sum,
)


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

  prior_mean: Any
  prior_precision: Any
  kron: dict
  ncl_damping: jax.Array  # shape=(), float32
  ncl_decay: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> NCLState:
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

  def _diag_outside(self, new) -> Any:
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


def _row_blocks(leaves, rows) -> list[jax.Array]:
  """A Kronecker layer's rows: ``[kernel [in, out]]`` or ``[kernel, bias [1, out]]`` (float32)."""
  blocks = [jnp.asarray(leaves[rows[0]], jnp.float32)]
  if len(rows) > 1:
    blocks.append(jnp.asarray(leaves[rows[1]], jnp.float32)[None])
  return blocks


def _left(m: jax.Array, blocks: list[jax.Array]) -> list[jax.Array]:
  """``m @ concatenate(blocks)`` as row blocks, without concatenating.

  Appending the bias row to a kernel whose rows are sharded would gather the
  kernel on every device; block products keep it sharded (a replicated
  factor times a sharded block is local work plus a reduction).
  """
  edges = np.cumsum([0] + [b.shape[0] for b in blocks])
  return [
    sum(m[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] @ b for c, b in enumerate(blocks))
    for r in range(len(blocks))
  ]


def ncl(
  data_size: float,
  *,
  strength: float = 1.0,
  damping: float = 1e-3,
  decay: float = 1.0,
  radius: float | None = None,
  precision: str = "diag",
  layers: Sequence[str] = (),
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
  far (per data point, like a mean loss), :math:`\alpha` = ``damping``,
  :math:`\lambda` = ``strength`` and :math:`N` = ``data_size``. This is the
  paper's update (Eq. 9-10: the preconditioned gradient of
  :math:`\ell_k + \tfrac{\lambda}{2}\|\theta-\mu\|^2_\Lambda` for
  :math:`\alpha \to 0`). Both official codes precondition the whole
  regularised gradient instead, :math:`(\Lambda+\alpha^2 I)^{-1}(g +
  \lambda\Lambda(\theta-\mu))`; ``precondition_penalty=True`` does that (the
  two agree for :math:`\alpha = 0`; for Kronecker layers it costs two more
  matmuls per layer and step).

  Trust region: the step is the minimiser of the linearised loss within a
  :math:`\Lambda`-norm ball, whose size the learning rate sets. With
  ``radius=r`` the direction is also clipped,
  :math:`\delta \leftarrow \delta \min(1, r / \|\delta\|_\Lambda)`, so
  :math:`\sqrt{\delta^\top \Lambda \delta} \le r` always (the step of
  ``sgd(lr)`` is then at most ``lr * r`` in that norm).

  ``precision="diag"``: :math:`\Lambda` is a pytree like params.
  ``precision="kfac"``: :math:`\Lambda \approx A \otimes G` for each of
  ``layers`` (dense layers ``{kernel [in, out], bias [out]}``, the bias
  folded in as a homogeneous input coordinate); parameters outside the layers
  keep a diagonal precision. The ``precision=`` signal is then
  ``{layer: KronFactors(a, g)}`` (what :func:`cl_optax.importance.kfac_factors`
  returns) plus, if there are parameters outside the layers, their diagonal
  Fisher at their key paths in the same dict. The damped inverses
  :math:`(A + \tfrac{\alpha}{\pi}I)^{-1}`, :math:`(G + \alpha\pi I)^{-1}`
  (the official code's split of :math:`\alpha^2 I` between the factors) are
  computed once per task at ``consolidate`` by eigendecomposition, so a step
  costs two matmuls per layer: :math:`A_s^{-1}\,\bar g\,G_s^{-1}`.

  Prior and consolidation, as in both official codes: before the first task
  :math:`\Lambda_0 = I/N` (Kronecker: :math:`A_0 = G_0 = I/\sqrt N`) and
  :math:`\mu_0 = 0` (``prior_mean="init"``: the initial params);
  ``cl_optax.consolidate(state, params, precision=F_k)`` sets
  :math:`\mu \leftarrow \theta` and :math:`\Lambda_k = \gamma\Lambda_{k-1} +
  F_k` (Kronecker: the sum re-approximated by one Kronecker product with the
  trace heuristic, van de Ven's ``additive_nearest_kf``; tachukao/ncl fits a
  KL-optimal product by fixed-point iteration instead, not done here).
  Dividing by :math:`N` folds the official code's ``lr / data_size`` into the
  transform, so ``sgd(lr)`` uses the official learning rate.

  Departures: the prior-sum re-approximation uses the trace heuristic (not the
  KL-optimal fit of the RNN code); damped eigenvalues get a relative floor of
  1e-9 so a singular factor never gives an infinite inverse; momentum, if
  wanted, comes from the following ``sgd`` (the official RNN code applies it
  before the preconditioner, which is the same linear map within a task). A
  change of ``damping`` through ``inject_hyperparams`` reaches the Kronecker
  inverses at the next ``consolidate`` (diagonal: at once). Non-finite
  gradient entries pass through unchanged; a Kronecker layer (kernel and
  bias) holding one passes its whole gradient unchanged, since the matmuls
  would spread it over the layer. Both stay out of the trust-region norm.

  Args:
    data_size: :math:`N`, the number of training examples per task (official
      defaults: 60000 permuted MNIST, 12000 split MNIST).
    strength: :math:`\lambda`, weight of the pull to the prior mean.
    damping: :math:`\alpha` (the paper tunes it: :math:`\alpha\to\infty` is
      K-FAC-Laplace / EWC-like, :math:`\alpha\to 0` full NCL).
    decay: :math:`\gamma` of the prior update (1 = no forgetting).
    radius: optional trust-region radius :math:`r` in the :math:`\Lambda`-norm.
    precision: ``"diag"`` or ``"kfac"``.
    layers: with ``"kfac"``, ``/``-separated key paths of the dense layers.
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
  if precision not in ("diag", "kfac"):
    raise ValueError(f"ncl: `precision` must be 'diag' or 'kfac'; got {precision!r}.")
  if prior_mean not in ("zeros", "init"):
    raise ValueError(f"ncl: `prior_mean` must be 'zeros' or 'init'; got {prior_mean!r}.")
  layers = tuple(layers)
  if precision == "kfac" and not layers:
    raise ValueError("ncl: precision='kfac' needs `layers=` (key paths of the dense layers).")
  if precision == "diag" and layers:
    raise ValueError("ncl: `layers=` is only used with precision='kfac'.")

  prec_dtype = jnp.float32 if precision_dtype is None else precision_dtype

  for arg, value, low, open_low in (
    ("data_size", data_size, 0.0, True),
    ("strength", strength, 0.0, False),
    ("damping", damping, 0.0, False),
    ("radius", radius, 0.0, True),
  ):
    _checks.check_hyperparameter(value, transform="ncl", name=arg, low=low, open_low=open_low)
  _checks.check_hyperparameter(decay, transform="ncl", name="decay", low=0.0, high=1.0)

  def init_fn(params):
    n = jnp.asarray(data_size, jnp.float32)
    if prior_mean == "zeros":
      mean = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
    else:
      mean = jax.tree.map(lambda p: _trees.fresh(p, jnp.float32), params)
    kron = {}
    if precision == "kfac":
      for name in layers:
        _trees.layer_subtree(params, name)
      for name in layers:
        sub = _trees.layer_subtree(params, name)
        d_in, d_out = jnp.shape(sub["kernel"])
        d_in += 1 if "bias" in sub else 0
        a = jnp.eye(d_in, dtype=jnp.float32) / jnp.sqrt(n)
        g = jnp.eye(d_out, dtype=jnp.float32) / jnp.sqrt(n)
        kron[name] = NCLKron(a, g, *damped_inverses(a, g, damping))
      roles = leaf_roles(params, layers)
      leaves, treedef = jax.tree.flatten(params, is_leaf=_trees.is_masked)
      prec = treedef.unflatten(
        [
          optax.MaskedNode()
          if r is not None or _trees.is_masked(x)
          else (jnp.ones_like(x, dtype=jnp.float32) / n).astype(prec_dtype)
          for r, x in zip(roles, leaves)
        ]
      )
    else:
      prec = jax.tree.map(
        lambda p: (jnp.ones_like(p, dtype=jnp.float32) / n).astype(prec_dtype), params
      )
    return NCLState(
      prior_mean=mean,
      prior_precision=prec,
      kron=kron,
      ncl_damping=jnp.asarray(damping, jnp.float32),
      ncl_decay=jnp.asarray(decay, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("ncl: update needs `params` (the pull to the prior mean uses them).")
    alpha2 = jnp.square(jnp.asarray(damping, jnp.float32))
    lam = jnp.asarray(strength, jnp.float32)
    n = jnp.asarray(data_size, jnp.float32)
    _checks.check_updates(updates, state.prior_mean, transform="ncl")
    _checks.check_updates(params, state.prior_mean, transform="ncl", name="params")
    u_leaves, treedef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)
    p_leaves = jax.tree.leaves(params, is_leaf=_trees.is_masked)
    m_leaves = jax.tree.leaves(state.prior_mean, is_leaf=_trees.is_masked)
    f_leaves = jax.tree.leaves(state.prior_precision, is_leaf=_trees.is_masked)
    if not (len(u_leaves) == len(p_leaves) == len(m_leaves) == len(f_leaves)):
      raise ValueError(
        f"ncl: updates/params do not match the state: {len(u_leaves)} update leaves, "
        f"{len(p_leaves)} params leaves, {len(m_leaves)} state leaves."
      )
    out = list(u_leaves)
    sq_norm = jnp.zeros((), jnp.float32)

    for i, (u, p, m, f) in enumerate(zip(u_leaves, p_leaves, m_leaves, f_leaves)):
      if _trees.is_masked(u) or _trees.is_masked(f) or u is None:
        continue
      g = u.astype(jnp.float32)
      f = f.astype(jnp.float32)
      diff = jnp.asarray(p, jnp.float32) - m
      if precondition_penalty:
        d = (g + lam * f * diff) / (f + alpha2)
      else:
        d = g / (f + alpha2) + lam * diff
      d = d / n
      if radius is not None:  # non-finite entries pass unchanged, outside the norm
        sq_norm += jnp.sum(jnp.where(jnp.isfinite(d), f * jnp.square(d), 0.0))
      out[i] = d

    if state.kron:
      roles = leaf_roles(updates, layers)
      for name, k in state.kron.items():
        idx = {r[1]: i for i, r in enumerate(roles) if r is not None and r[0] == name}
        ik, ib = idx["kernel"], idx.get("bias")
        rows = [ik] if ib is None else [ik, ib]

        g = _row_blocks(u_leaves, rows)
        diff = [x - y for x, y in zip(_row_blocks(p_leaves, rows), _row_blocks(m_leaves, rows))]
        if precondition_penalty:
          inner = [gi + lam * (x @ k.g) for gi, x in zip(g, _left(k.a, diff))]
          d = [x @ k.g_inv / n for x in _left(k.a_inv, inner)]
        else:
          d = [(x @ k.g_inv + lam * di) / n for x, di in zip(_left(k.a_inv, g), diff)]
        # A non-finite entry would spread over the layer: such a layer passes unchanged.
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in g]))
        if radius is not None:
          norm2 = sum(jnp.sum(x * (y @ k.g)) for x, y in zip(d, _left(k.a, d)))
          sq_norm += jnp.where(finite, norm2, 0.0)
        out[ik] = jnp.where(finite, d[0], g[0])
        if ib is not None:
          out[ib] = jnp.where(finite, d[1][0], g[1][0])

    if radius is not None:
      r = jnp.asarray(radius, jnp.float32)
      norm = jnp.sqrt(sq_norm)
      scale = jnp.where(norm > r, r / jnp.where(norm > 0, norm, 1.0), 1.0)
      out = [o if _trees.is_masked(o) or o is None else o * scale for o in out]

    def finish(u, d):
      if _trees.is_masked(u) or u is None:
        return u
      return jnp.where(jnp.isfinite(u), d, u.astype(jnp.float32)).astype(u.dtype)

    new = treedef.unflatten([finish(u, d) for u, d in zip(u_leaves, out)])
    state = state._replace(
      ncl_damping=jnp.asarray(damping, jnp.float32), ncl_decay=jnp.asarray(decay, jnp.float32)
    )
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
