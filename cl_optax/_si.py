"""Synaptic intelligence: :func:`si`, its path integral accumulated inside ``update``."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._penalty import add_penalty, copy_f32, f32_like, zeros

_NO_FLOOR = float(jnp.finfo(jnp.float32).min)


class SIState(NamedTuple):
  """State of :func:`si`.

  Attributes:
    si_anchor: :math:`\\tilde\\theta`, params at the end of the previous
      task (= the start of the current one).
    si_importance: :math:`\\Omega`, the consolidated importance.
    path_integral: :math:`s = \\omega + g_{t}\\odot(\\theta_{t} - \\tilde\\theta)`:
      this task's running path integral :math:`\\omega` plus the gradient
      recorded at the last update times the displacement from the anchor it
      was recorded at (so no copy of the previous params is kept; see
      :func:`si`).
    prev_grad: the gradient :math:`g_t` recorded at the previous update.
    si_xi: :math:`\\xi` used at ``consolidate`` (refreshed at every update).
    si_floor: the lower bound of :math:`\\Omega` after a merge: ``0.0`` with
      ``nonnegative=True`` (Zenke's ``relu``), the lowest finite float32
      otherwise (no clip, and every state leaf stays finite).
  """

  TRANSFORM = "si"
  SIGNALS = ()
  EXTRA_ARGS = ()

  si_anchor: Any
  si_importance: Any
  path_integral: Any
  prev_grad: Any
  si_xi: jax.Array  # shape=(), float32
  si_floor: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> SIState:
    """Closes the path integral and adds ``omega / (Delta^2 + xi)`` to ``Omega``."""
    del signals  # SI needs none
    params = _trees.restrict_like(self.si_anchor, params, transform="si", name="params")
    params = f32_like(self.si_anchor, params)

    def merge(o, s, g, p, start):
      delta = p - start
      w = s - g * delta  # omega, with the last step's contribution
      # A parameter that did not move (with xi = 0: 0 / 0) gains no importance.
      den = jnp.square(delta) + self.si_xi
      gain = jnp.where(den > 0, w / jnp.where(den > 0, den, 1.0), 0.0)
      return jnp.maximum(o + gain, self.si_floor).astype(o.dtype)

    omega = _trees.map_unmasked(
      merge, self.si_importance, self.path_integral, self.prev_grad, params, self.si_anchor
    )
    cleared = _trees.map_unmasked(lambda o: jnp.zeros_like(o, jnp.float32), omega)
    return self._replace(
      si_anchor=params,
      si_importance=omega,
      path_integral=cleared,
      prev_grad=jax.tree.map(jnp.copy, cleared),  # every state leaf owns its buffer
    )


def si(
  strength: float = 1.0,
  *,
  xi: float = 0.1,
  include_penalty: bool = False,
  nonnegative: bool = False,
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
  ``consolidate`` adds the last step's term from the final params). The state
  keeps :math:`s_t = \omega_t + g_t\odot(\theta_t-\tilde\theta)` instead of
  :math:`\omega_t` and :math:`\theta_t`: then :math:`s_{t+1} = s_t +
  (g_{t+1} - g_t)\odot(\theta_{t+1}-\tilde\theta)` reads the anchor the
  penalty reads anyway, and :math:`\omega = s - g_t\odot(\theta_{\rm
  end}-\tilde\theta)` at ``consolidate`` -- the same sum with one
  params-sized array fewer to keep, read and write at every step. So SI can
  sit anywhere in the chain, before SGD or before Adam, and the change is the
  one really applied. :math:`g_t` is SI's *input* ``updates``: placed first in
  the chain that is the loss gradient without the penalty (Zenke's code);
  ``include_penalty=True`` records the gradient with SI's own penalty added
  (van de Ven's code uses the total loss gradient). ``consolidate(state,
  params)`` needs no signal; it sets :math:`\tilde\theta \leftarrow \theta`
  and resets :math:`\omega`. By default :math:`\Omega` is not clipped (a
  negative :math:`\omega` stays, as in van de Ven's and mammoth's code);
  ``nonnegative=True`` merges as Zenke's code does,
  :math:`\Omega \leftarrow \max(\Omega + \omega / (\Delta^2 + \xi), 0)`
  (``tf.nn.relu`` over the summed importance, ``pathint/protocols.py``).

  Zenke's loss :math:`c\sum\Omega(\tilde\theta-\theta)^2` has no 1/2:
  ``strength = 2 * c``. Paper: c = 0.1 (permuted MNIST), 1 (split MNIST).
  :math:`\xi`: 0.1 in Zenke's permuted-MNIST run (``xi=0.1`` in its results
  file name), 1e-3 in its split-MNIST notebook and split-CIFAR run; van de
  Ven's code default 0.1.

  Args:
    strength: :math:`\lambda` (= 2c).
    xi: :math:`\xi`, used at ``consolidate`` (kept in the state, refreshed at
      every update).
    include_penalty: record the gradient with SI's penalty added.
    nonnegative: clip :math:`\Omega` at 0 after each merge (Zenke's code).
    importance_dtype: storage dtype of the importance, as in :func:`cl_optax.ewc`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zenke, Poole, Ganguli, *Continual learning through synaptic intelligence*,
    ICML 2017, Eq. 3-5; code GMvandeVen/continual-learning
    (``update_importance_estimates``, ``update_omega``).
  """

  _checks.check_hyperparameter(strength, transform="si", name="strength", low=0.0)
  _checks.check_hyperparameter(xi, transform="si", name="xi", low=0.0)

  def init_fn(params: optax.Params) -> SIState:
    return SIState(
      si_anchor=copy_f32(params),
      si_importance=zeros(params, importance_dtype),
      path_integral=zeros(params),
      prev_grad=zeros(params),
      si_xi=jnp.asarray(xi, jnp.float32),
      si_floor=jnp.asarray(0.0 if nonnegative else _NO_FLOOR, jnp.float32),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("si", extra_args)
    del extra_args
    state = cast(SIState, state)
    out = add_penalty(updates, params, state.si_anchor, state.si_importance, strength, "si")
    recorded = out if include_penalty else updates

    def step(s, g_new, g_old, p, start):
      delta = jnp.asarray(p, jnp.float32) - start
      return s + (jnp.asarray(g_new, jnp.float32) - g_old) * delta

    path = _trees.map_unmasked(
      step, state.path_integral, recorded, state.prev_grad, params, state.si_anchor
    )
    state = state._replace(
      path_integral=path,
      prev_grad=f32_like(state.prev_grad, recorded),
      si_xi=jnp.asarray(xi, jnp.float32),
    )
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
