r"""Importance-weighted quadratic penalties as gradient transforms: EWC, online EWC, SI, MAS.

Each method adds the gradient of a quadratic penalty
:math:`\tfrac{\lambda}{2}\sum_i \Omega_i(\theta_i - \theta^*_i)^2` to the
incoming gradient,

.. math::
  g \leftarrow g + \lambda\, \Omega \odot (\theta - \theta^*),

so the loss function stays the task loss and the method lives in the
optimiser: ``optax.chain(cl_optax.ewc(100.0), optax.adam(1e-3))``. Put the
transform *first* in the chain, where its input is the loss gradient (after
an adaptive optimiser the penalty would be added to a step, not a gradient).
``cl_optax.consolidate(opt_state, params, importance=Omega_task)`` ends a task:
it sets the anchor :math:`\theta^*` and merges :math:`\Omega` by the method's
rule. SI needs no signal: it integrates its importance inside ``update``.

Papers that write the penalty without the 1/2 (MAS, SI) have a :math:`\lambda`
half of ours: ``mas(strength=2 * lambda_paper)``, ``si(strength=2 * c)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _state

PyTree = Any
_is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731


def check_nonnegative(tree: PyTree, *, transform: str, name: str) -> None:
  """Raises a ``ValueError`` naming the leaf with negative or non-finite values.

  Value checks need concrete arrays; under ``jit`` they are skipped.
  """
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(x, jax.core.Tracer) or np.size(x) == 0:
      continue
    a = np.asarray(jnp.asarray(x, jnp.float32))
    if not np.all(np.isfinite(a)):
      raise ValueError(
        f"{transform}: `{name}` leaf {jax.tree_util.keystr(path)} holds non-finite "
        "values; expected finite values >= 0."
      )
    if a.min() < 0:
      raise ValueError(
        f"{transform}: `{name}` leaf {jax.tree_util.keystr(path)} has a negative "
        f"value {float(a.min()):g}; expected values >= 0 (an importance / precision)."
      )


def _f32_like(template: PyTree, tree: PyTree) -> PyTree:
  return jax.tree.map(
    lambda t, x: t if _is_masked(t) else jnp.asarray(x, jnp.float32),
    template,
    tree,
    is_leaf=_is_masked,
  )


def _zeros(params: PyTree, dtype: Any = None) -> PyTree:
  dtype = jnp.float32 if dtype is None else dtype
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)


def _copy(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def _signal(self, params, signals, transform):
  """Validated ``importance`` and params, cut to the state's structure."""
  new = _state.require_signal(signals, "importance", transform, "a non-negative pytree like params")
  new = _state.restrict_like(self.anchor_params, new, transform=transform, name="importance")
  _state.check_shapes(self.anchor_params, new, transform=transform, name="importance")
  check_nonnegative(new, transform=transform, name="importance")
  params = _state.restrict_like(self.anchor_params, params, transform=transform, name="params")
  return _f32_like(self.anchor_params, new), _f32_like(self.anchor_params, params)


def _add_penalty(updates, params, anchor, omega, strength, transform):
  if params is None:
    raise ValueError(f"{transform}: update needs `params` (the penalty pulls them to the anchor).")
  lam = jnp.asarray(strength, jnp.float32)

  def add(u, p, a, o):
    if _is_masked(u) or _is_masked(a) or u is None:
      return u
    pen = lam * o.astype(jnp.float32) * (jnp.asarray(p, jnp.float32) - a)
    return (u.astype(jnp.float32) + pen).astype(u.dtype)

  return jax.tree.map(add, updates, params, anchor, omega, is_leaf=_is_masked)


# ------------------------------------------------------------------------- EWC


class EWCState(NamedTuple):
  """State of :func:`ewc`.

  Attributes:
    anchor_params: the Fisher-weighted mean of the per-task anchors,
      :math:`\\bar\\theta = \\sum_k F_k\\theta^*_k / \\sum_k F_k`.
    fisher: :math:`\\sum_k F_k`, the summed diagonal Fisher of all tasks.
  """

  anchor_params: PyTree
  fisher: PyTree

  def consolidate(self, params, **signals) -> EWCState:
    """Adds the task's penalty: ``F <- F + F_k``, anchor <- weighted mean."""
    new, params = _signal(self, params, signals, "ewc")

    def merge(a, f, fk, p):
      if _is_masked(a):
        return a, f
      f32 = f.astype(jnp.float32)
      total = f32 + fk
      safe = jnp.where(total > 0, total, 1.0)
      return jnp.where(total > 0, (f32 * a + fk * p) / safe, p), total.astype(f.dtype)

    pairs = jax.tree.map(merge, self.anchor_params, self.fisher, new, params, is_leaf=_is_masked)
    is_pair = lambda x: isinstance(x, tuple) and not hasattr(x, "_fields")  # noqa: E731
    anchor = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    fisher = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    return EWCState(anchor_params=anchor, fisher=fisher)


def ewc(
  strength: float = 1.0, *, importance_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Elastic weight consolidation (Kirkpatrick et al., 2017), one penalty per task.

  The original (offline) EWC keeps one penalty per finished task,
  :math:`\sum_k \tfrac{\lambda}{2}\sum_i F_{k,i}(\theta_i-\theta^*_{k,i})^2`.
  Its gradient is
  :math:`\lambda\,(\textstyle\sum_k F_k)\odot(\theta - \bar\theta)` with the
  Fisher-weighted mean anchor :math:`\bar\theta = \sum_k F_k\theta^*_k /
  \sum_k F_k`, so this transform is *exactly* the sum of the per-task
  penalties at O(1) memory (two pytrees), not an approximation of it.

  ``cl_optax.consolidate(state, params, importance=F_k)`` with ``F_k`` from
  :func:`cl_optax.importance.fisher_diag`. Same :math:`\lambda` as the paper
  (its penalty has the 1/2).

  Args:
    strength: :math:`\lambda`.
    importance_dtype: storage dtype of the importance (float32 when ``None``;
      ``jnp.bfloat16`` halves its memory and traffic; the anchor stays float32).
      Under ``optax.inject_hyperparams`` list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Kirkpatrick et al., *Overcoming catastrophic forgetting in neural
    networks*, PNAS 2017, Eq. 3; code GMvandeVen/continual-learning
    (``ewc_loss``, ``offline=True``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(cl_optax.ewc(2.0), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(state, params, importance={"w": jnp.array([1.0, 0.0])})
    >>> tx.update({"w": jnp.zeros(2)}, state, {"w": jnp.ones(2)})[0]["w"]  # -2 F (w - 0)
    Array([-2., -0.], dtype=float32)
  """

  def init_fn(params):
    return EWCState(anchor_params=_copy(params), fisher=_zeros(params, importance_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    out = _add_penalty(updates, params, state.anchor_params, state.fisher, strength, "ewc")
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class OnlineEWCState(NamedTuple):
  """State of :func:`online_ewc`.

  Attributes:
    anchor_params: :math:`\\theta^*`, the params at the end of the last task.
    fisher: :math:`\\tilde F = \\gamma \\tilde F + F_k`, the running Fisher.
    decay: :math:`\\gamma` used at ``consolidate``; refreshed from the factory
      argument at every update (so ``optax.inject_hyperparams`` reaches it).
  """

  anchor_params: PyTree
  fisher: PyTree
  decay: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> OnlineEWCState:
    """``F <- decay * F + F_k``; anchor <- params."""
    new, params = _signal(self, params, signals, "online_ewc")
    fisher = jax.tree.map(
      lambda f, fk: f if _is_masked(f) else (self.decay * f + fk).astype(f.dtype),
      self.fisher,
      new,
      is_leaf=_is_masked,
    )
    return self._replace(anchor_params=params, fisher=fisher)


def online_ewc(
  strength: float = 1.0, decay: float = 1.0, *, importance_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Online EWC (Schwarz et al., 2018; EWC++ of Chaudhry et al., 2018).

  .. math::
    g \leftarrow g + \lambda \tilde F \odot (\theta - \theta^*), \qquad
    \tilde F_k = \gamma \tilde F_{k-1} + F_k, \quad \theta^* = \theta_k

  One penalty around the latest anchor, O(1) memory. van de Ven's code
  multiplies the running Fisher by :math:`\gamma` once more inside the loss;
  here the penalty uses :math:`\tilde F` as defined above (Progress &
  Compress, Eq. 6 with :math:`\gamma` applied at the merge). Same
  :math:`\lambda` as the papers (their penalty has the 1/2).

  Args:
    strength: :math:`\lambda`.
    decay: :math:`\gamma \in [0, 1]`, applied at ``consolidate``.
    importance_dtype: storage dtype of the importance (float32 when ``None``;
      ``jnp.bfloat16`` halves its memory and traffic; the anchor stays float32).
      Under ``optax.inject_hyperparams`` list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Schwarz et al., *Progress & Compress: A scalable framework for continual
    learning*, ICML 2018, Sec. 2.3; Chaudhry et al., *Riemannian Walk for
    incremental learning*, ECCV 2018.
  """

  def init_fn(params):
    return OnlineEWCState(
      anchor_params=_copy(params),
      fisher=_zeros(params, importance_dtype),
      decay=jnp.asarray(decay, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    out = _add_penalty(updates, params, state.anchor_params, state.fisher, strength, "online_ewc")
    return out, state._replace(decay=jnp.asarray(decay, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------- MAS


class MASState(NamedTuple):
  """State of :func:`mas`.

  Attributes:
    anchor_params: :math:`\\theta^*`, the params at the end of the last task.
    mas_importance: :math:`\\Omega`, the sum of the tasks' MAS importances.
  """

  anchor_params: PyTree
  mas_importance: PyTree

  def consolidate(self, params, **signals) -> MASState:
    """``Omega <- Omega + Omega_k`` (the paper's accumulation); anchor <- params."""
    new, params = _signal(self, params, signals, "mas")
    total = jax.tree.map(
      lambda o, n: o if _is_masked(o) else (o + n).astype(o.dtype),
      self.mas_importance,
      new,
      is_leaf=_is_masked,
    )
    return MASState(anchor_params=params, mas_importance=total)


def mas(
  strength: float = 1.0, *, importance_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Memory aware synapses (Aljundi et al., 2018).

  .. math::
    g \leftarrow g + \lambda\,\Omega\odot(\theta-\theta^*), \qquad
    \Omega = \textstyle\sum_k \Omega_k

  with :math:`\Omega_k` from :func:`cl_optax.importance.mas`, summed over
  tasks as in the paper (Avalanche/FACIL use a moving average instead). The
  paper's penalty :math:`\lambda_p\sum\Omega(\theta-\theta^*)^2` has no 1/2:
  ``strength = 2 * lambda_p``.

  Args:
    strength: :math:`\lambda` (twice the paper's).
    importance_dtype: storage dtype of the importance (float32 when ``None``;
      ``jnp.bfloat16`` halves its memory and traffic; the anchor stays float32).
      Under ``optax.inject_hyperparams`` list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars, *Memory Aware Synapses:
    Learning what (not) to forget*, ECCV 2018, Eq. 3 and 6.
  """

  def init_fn(params):
    return MASState(anchor_params=_copy(params), mas_importance=_zeros(params, importance_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    out = _add_penalty(updates, params, state.anchor_params, state.mas_importance, strength, "mas")
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------------- SI


class SIState(NamedTuple):
  """State of :func:`si`.

  Attributes:
    anchor_params: :math:`\\tilde\\theta`, params at the end of the previous
      task (= the start of the current one).
    si_importance: :math:`\\Omega`, the consolidated importance.
    path_integral: :math:`\\omega`, this task's running path integral.
    prev_params: the ``params`` seen at the previous update.
    prev_grad: the gradient recorded at the previous update.
    damping: :math:`\\xi` used at ``consolidate`` (refreshed at every update).
  """

  anchor_params: PyTree
  si_importance: PyTree
  path_integral: PyTree
  prev_params: PyTree
  prev_grad: PyTree
  damping: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> SIState:
    """Closes the path integral and adds ``omega / (Delta^2 + xi)`` to ``Omega``."""
    del signals  # SI needs none
    params = _state.restrict_like(self.anchor_params, params, transform="si", name="params")
    params = _f32_like(self.anchor_params, params)

    def merge(o, w, g, prev, p, start):
      if _is_masked(o):
        return o
      w = w - g * (p - prev)  # the last step's contribution
      return (o + w / (jnp.square(p - start) + self.damping)).astype(o.dtype)

    omega = jax.tree.map(
      merge,
      self.si_importance,
      self.path_integral,
      self.prev_grad,
      self.prev_params,
      params,
      self.anchor_params,
      is_leaf=_is_masked,
    )
    zeros = jax.tree.map(
      lambda o: o if _is_masked(o) else jnp.zeros_like(o), omega, is_leaf=_is_masked
    )
    return self._replace(
      anchor_params=params,
      si_importance=omega,
      path_integral=zeros,
      prev_params=params,
      prev_grad=zeros,
    )


def si(
  strength: float = 1.0,
  damping: float = 0.1,
  *,
  include_penalty: bool = False,
  importance_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Synaptic intelligence (Zenke, Poole, Ganguli, 2017).

  .. math::
    g \leftarrow g + \lambda\,\Omega\odot(\theta - \tilde\theta), \qquad
    \omega \mathrel{+}= -g_t \odot (\theta_{t+1} - \theta_t), \qquad
    \Omega \mathrel{+}= \frac{\omega}{(\theta_{\rm end} - \tilde\theta)^2 + \xi}

  The path integral :math:`\omega` is accumulated inside ``update``: the
  parameter change of a step is read as the difference of consecutive
  ``params`` (at update :math:`t+1` SI adds :math:`-g_t\odot(\theta_{t+1} -
  \theta_t)` with the gradient :math:`g_t` it recorded at update :math:`t`;
  ``consolidate`` adds the last step's term from the final params). So SI can
  sit anywhere in the chain, before SGD or before Adam, and the change is the
  one really applied. :math:`g_t` is SI's *input* ``updates``: placed first in
  the chain that is the loss gradient without the penalty (Zenke's code);
  ``include_penalty=True`` records the gradient with SI's own penalty added
  (van de Ven's code uses the total loss gradient). ``consolidate(state,
  params)`` needs no signal; it sets :math:`\tilde\theta \leftarrow \theta`
  and resets :math:`\omega`. :math:`\Omega` is not clipped (a negative
  :math:`\omega` stays, as in both codes).

  Zenke's loss :math:`c\sum\Omega(\tilde\theta-\theta)^2` has no 1/2:
  ``strength = 2 * c``. Paper: c = 0.1 (permuted MNIST), 1 (split MNIST),
  :math:`\xi` = 1e-3; van de Ven's code default :math:`\xi` = 0.1.

  Args:
    strength: :math:`\lambda` (= 2c).
    damping: :math:`\xi`, used at ``consolidate``.
    include_penalty: record the gradient with SI's penalty added.
    importance_dtype: storage dtype of the importance (float32 when ``None``;
      ``jnp.bfloat16`` halves its memory and traffic; the anchor stays float32).
      Under ``optax.inject_hyperparams`` list it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zenke, Poole, Ganguli, *Continual learning through synaptic intelligence*,
    ICML 2017, Eq. 3-5; code GMvandeVen/continual-learning
    (``update_importance_estimates``, ``update_omega``).
  """

  def init_fn(params):
    return SIState(
      anchor_params=_copy(params),
      si_importance=_zeros(params, importance_dtype),
      path_integral=_zeros(params),
      prev_params=_copy(params),
      prev_grad=_zeros(params),
      damping=jnp.asarray(damping, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    out = _add_penalty(updates, params, state.anchor_params, state.si_importance, strength, "si")
    recorded = out if include_penalty else updates

    def step(w, g, prev, p):
      if _is_masked(w):
        return w
      return w - g * (jnp.asarray(p, jnp.float32) - prev)

    path = jax.tree.map(
      step, state.path_integral, state.prev_grad, state.prev_params, params, is_leaf=_is_masked
    )
    prev_grad = _f32_like(state.prev_grad, recorded)
    prev_params = _f32_like(state.prev_params, params)
    state = state._replace(
      path_integral=path,
      prev_params=prev_params,
      prev_grad=prev_grad,
      damping=jnp.asarray(damping, jnp.float32),
    )
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
