"""Elastic weight consolidation: :func:`ewc` (one penalty per task) and :func:`online_ewc`."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._penalty import add_penalty, copy_f32, importance_signal, penalty_update, zeros


class EWCState(NamedTuple):
  """State of :func:`ewc`.

  Attributes:
    ewc_anchor: the Fisher-weighted mean of the per-task anchors,
      :math:`\\bar\\theta = \\sum_k F_k\\theta^*_k / \\sum_k F_k`.
    ewc_importance: :math:`\\sum_k F_k`, the summed diagonal Fisher of all tasks.
  """

  TRANSFORM = "ewc"
  SIGNALS = ("importance",)
  EXTRA_ARGS = ()

  ewc_anchor: Any
  ewc_importance: Any

  def consolidate(self, params: optax.Params, **signals: Any) -> EWCState:
    """Adds the task's penalty: ``F <- F + F_k``, anchor <- weighted mean."""
    new, params = importance_signal(self.ewc_anchor, params, signals, "ewc")

    def merge(a, f, fk, p):
      f32 = f.astype(jnp.float32)
      total = f32 + fk
      safe = jnp.where(total > 0, total, 1.0)
      return jnp.where(total > 0, (f32 * a + fk * p) / safe, p), total.astype(f.dtype)

    fields = (self.ewc_anchor, self.ewc_importance, new, params)
    # Two maps, not one map and a transpose: a state with no unmasked leaf has no pairs.
    anchor = _trees.map_unmasked(lambda *x: merge(*x)[0], *fields)
    fisher = _trees.map_unmasked(lambda *x: merge(*x)[1], *fields)
    return EWCState(ewc_anchor=anchor, ewc_importance=fisher)


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

  _checks.check_hyperparameter(strength, transform="ewc", name="strength", low=0.0)

  def init_fn(params: optax.Params) -> EWCState:
    return EWCState(ewc_anchor=copy_f32(params), ewc_importance=zeros(params, importance_dtype))

  update_fn = penalty_update("ewc_anchor", "ewc_importance", strength, "ewc")
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class OnlineEWCState(NamedTuple):
  """State of :func:`online_ewc`.

  Attributes:
    online_ewc_anchor: :math:`\\theta^*`, the params at the end of the last task.
    online_ewc_importance: :math:`\\tilde F = \\gamma \\tilde F + F_k`, the running Fisher.
    online_ewc_decay: :math:`\\gamma` used at ``consolidate``; refreshed from the factory
      argument at every update (so ``optax.inject_hyperparams`` reaches it).
  """

  TRANSFORM = "online_ewc"
  SIGNALS = ("importance",)
  EXTRA_ARGS = ()

  online_ewc_anchor: Any
  online_ewc_importance: Any
  online_ewc_decay: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> OnlineEWCState:
    """``F <- decay * F + F_k``; anchor <- params."""
    new, params = importance_signal(self.online_ewc_anchor, params, signals, "online_ewc")
    fisher = _trees.map_unmasked(
      lambda f, fk: (self.online_ewc_decay * f + fk).astype(f.dtype),
      self.online_ewc_importance,
      new,
    )
    return self._replace(online_ewc_anchor=params, online_ewc_importance=fisher)


def online_ewc(
  strength: float = 1.0, *, decay: float = 1.0, importance_dtype: Any = None
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
    importance_dtype: storage dtype of the importance, as in :func:`cl_optax.ewc`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Schwarz et al., *Progress & Compress: A scalable framework for continual
    learning*, ICML 2018, Sec. 2.3; Chaudhry et al., *Riemannian Walk for
    incremental learning*, ECCV 2018.
  """

  _checks.check_hyperparameter(strength, transform="online_ewc", name="strength", low=0.0)
  _checks.check_hyperparameter(decay, transform="online_ewc", name="decay", low=0.0, high=1.0)

  def init_fn(params: optax.Params) -> OnlineEWCState:
    return OnlineEWCState(
      online_ewc_anchor=copy_f32(params),
      online_ewc_importance=zeros(params, importance_dtype),
      online_ewc_decay=jnp.asarray(decay, jnp.float32),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("online_ewc", extra_args)
    del extra_args
    state = cast(OnlineEWCState, state)
    out = add_penalty(
      updates, params, state.online_ewc_anchor, state.online_ewc_importance, strength, "online_ewc"
    )
    return out, state._replace(online_ewc_decay=jnp.asarray(decay, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
