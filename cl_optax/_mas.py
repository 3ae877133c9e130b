"""Memory aware synapses as a gradient transform: :func:`mas`."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from cl_optax import _checks, _trees
from cl_optax._penalty import copy_f32, importance_signal, penalty_update, zeros


class MASState(NamedTuple):
  """State of :func:`mas`.

  Attributes:
    mas_anchor: :math:`\\theta^*`, the params at the end of the last task.
    mas_importance: :math:`\\Omega`, the sum of the tasks' MAS importances.
  """

  TRANSFORM = "mas"
  SIGNALS = ("importance",)
  EXTRA_ARGS = ()

  mas_anchor: Any
  mas_importance: Any

  def consolidate(self, params: optax.Params, **signals: Any) -> MASState:
    """``Omega <- Omega + Omega_k`` (the paper's accumulation); anchor <- params."""
    new, params = importance_signal(self.mas_anchor, params, signals, "mas")
    total = _trees.map_unmasked(lambda o, n: (o + n).astype(o.dtype), self.mas_importance, new)
    return MASState(mas_anchor=params, mas_importance=total)


def mas(
  strength: float = 1.0, *, importance_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Memory aware synapses (Aljundi et al., 2018).

  .. math::
    g \leftarrow g + \lambda\,\Omega\odot(\theta-\theta^*), \qquad
    \Omega = \textstyle\sum_k \Omega_k

  with :math:`\Omega_k` from :func:`cl_optax.importance.mas_sensitivity`, summed over
  tasks as in the paper (Avalanche/FACIL use a moving average instead). The
  paper's penalty :math:`\lambda_p\sum\Omega(\theta-\theta^*)^2` has no 1/2:
  ``strength = 2 * lambda_p``.

  Args:
    strength: :math:`\lambda` (twice the paper's).
    importance_dtype: storage dtype of the importance, as in :func:`cl_optax.ewc`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars, *Memory Aware Synapses:
    Learning what (not) to forget*, ECCV 2018, Eq. 3 and 6.
  """

  _checks.check_hyperparameter(strength, transform="mas", name="strength", low=0.0)

  def init_fn(params: optax.Params) -> MASState:
    return MASState(mas_anchor=copy_f32(params), mas_importance=zeros(params, importance_dtype))

  update_fn = penalty_update("mas_anchor", "mas_importance", strength, "mas")
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
