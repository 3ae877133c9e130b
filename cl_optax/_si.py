"""Synaptic intelligence: :func:`si`, its path integral accumulated inside ``update``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _trees
from cl_optax._penalty import add_penalty, copy_f32, f32_like, zeros


class SIState(NamedTuple):
  """State of :func:`si`.

  Attributes:
    si_anchor: :math:`\\tilde\\theta`, params at the end of the previous
      task (= the start of the current one).
    si_importance: :math:`\\Omega`, the consolidated importance.
    path_integral: :math:`\\omega`, this task's running path integral.
    prev_params: the ``params`` seen at the previous update.
    prev_grad: the gradient recorded at the previous update.
    si_xi: :math:`\\xi` used at ``consolidate`` (refreshed at every update).
  """

  si_anchor: Any
  si_importance: Any
  path_integral: Any
  prev_params: Any
  prev_grad: Any
  si_xi: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> SIState:
    """Closes the path integral and adds ``omega / (Delta^2 + xi)`` to ``Omega``."""
    del signals  # SI needs none
    params = _trees.restrict_like(self.si_anchor, params, transform="si", name="params")
    params = f32_like(self.si_anchor, params)

    def merge(o, w, g, prev, p, start):
      if _trees.is_masked(o):
        return o
      w = w - g * (p - prev)  # the last step's contribution
      return (o + w / (jnp.square(p - start) + self.si_xi)).astype(o.dtype)

    omega = jax.tree.map(
      merge,
      self.si_importance,
      self.path_integral,
      self.prev_grad,
      self.prev_params,
      params,
      self.si_anchor,
      is_leaf=_trees.is_masked,
    )
    zeros = jax.tree.map(
      lambda o: o if _trees.is_masked(o) else jnp.zeros_like(o), omega, is_leaf=_trees.is_masked
    )
    return self._replace(
      si_anchor=params,
      si_importance=omega,
      path_integral=zeros,
      prev_params=jax.tree.map(jnp.copy, params),  # every state leaf owns its buffer
      prev_grad=jax.tree.map(jnp.copy, zeros),
    )


@_checks.renamed_arguments(renamed={"damping": "xi"}, positional=("xi",))
def si(
  strength: float = 1.0,
  *,
  xi: float = 0.1,
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
    xi: :math:`\xi`, used at ``consolidate`` (kept in the state, refreshed at
      every update).
    include_penalty: record the gradient with SI's penalty added.
    importance_dtype: storage dtype of the importance, as in :func:`cl_optax.ewc`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zenke, Poole, Ganguli, *Continual learning through synaptic intelligence*,
    ICML 2017, Eq. 3-5; code GMvandeVen/continual-learning
    (``update_importance_estimates``, ``update_omega``).
  """

  def init_fn(params):
    return SIState(
      si_anchor=copy_f32(params),
      si_importance=zeros(params, importance_dtype),
      path_integral=zeros(params),
      prev_params=copy_f32(params),
      prev_grad=zeros(params),
      si_xi=jnp.asarray(xi, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    out = add_penalty(updates, params, state.si_anchor, state.si_importance, strength, "si")
    recorded = out if include_penalty else updates

    def step(w, g, prev, p):
      if _trees.is_masked(w):
        return w
      return w - g * (jnp.asarray(p, jnp.float32) - prev)

    path = jax.tree.map(
      step,
      state.path_integral,
      state.prev_grad,
      state.prev_params,
      params,
      is_leaf=_trees.is_masked,
    )
    prev_grad = f32_like(state.prev_grad, recorded)
    prev_params = f32_like(state.prev_params, params)
    state = state._replace(
      path_integral=path,
      prev_params=prev_params,
      prev_grad=prev_grad,
      si_xi=jnp.asarray(xi, jnp.float32),
    )
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
