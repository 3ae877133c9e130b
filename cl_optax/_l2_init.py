r"""L2 Init (regenerative regularisation): :func:`l2_init`, a pull towards the initialisation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _penalty, _trees

_TRANSFORM = "l2_init"


class L2InitState(NamedTuple):
  r"""State of :func:`l2_init`.

  No boundary rule: the anchor is the initialisation, never moved at a task
  boundary (``consolidate`` returns the state unchanged).

  Attributes:
    l2_init_anchor: :math:`\theta_0`, a float32 copy of the parameters given
      to ``init`` (owning its buffers).
  """

  l2_init_anchor: Any

  def consolidate(self, params, **signals) -> L2InitState:
    """No boundary rule: the state unchanged (the anchor stays :math:`\\theta_0`)."""
    del params, signals
    return self


def l2_init(strength: float) -> optax.GradientTransformationExtraArgs:
  r"""L2 Init (Kumar, Marklund & Van Roy, 2023): regularisation towards the initial parameters.

  The loss :math:`L(\theta) + \lambda\lVert\theta - \theta_0\rVert_2^2`,
  as a gradient map:

  .. math::
    g \leftarrow g + 2\lambda\,(\theta - \theta_0)

  with :math:`\theta_0` the parameters passed to ``init`` (kept in float32,
  fixed for ever). Parameters the recent losses do not care about drift back
  to their initial values, which keeps plasticity; it differs from plain L2
  (weight decay) only by the centre :math:`\theta_0` instead of 0.

  **Place it before the optimiser**, where its input is the loss gradient:
  ``optax.chain(cl_optax.l2_init(1e-2), optax.adam(1e-3))`` (the penalty is
  part of the loss, so under Adam it is Adam-rescaled like coupled L2).
  ``init`` must see the true initial parameters (not a checkpoint restored
  later, not the parameters after a first task). It has no boundary rule:
  :func:`cl_optax.consolidate` leaves its state unchanged (moving the anchor at each
  boundary would be EWC-like anchoring with :math:`\Omega = 1`, not
  regeneration).

  Departures: the penalty is written as in the paper,
  :math:`\lambda\lVert\cdot\rVert^2` (gradient factor 2), not the library's
  :math:`\tfrac{\lambda}{2}` convention of :func:`cl_optax.ewc`. No official
  code was found, and the paper's :math:`\lambda` grid was not verified, so
  ``strength`` has no default.

  Args:
    strength: :math:`\lambda \ge 0` (``optax.inject_hyperparams`` can
      wrap it).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Kumar, Marklund & Van Roy, *Maintaining plasticity in continual learning
    via regenerative regularization*, arXiv:2308.11958 (CoLLAs 2024), the
    L2 Init objective.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = cl_optax.l2_init(0.5)
    >>> state = tx.init(params)
    >>> moved = {"w": jnp.array([2.0, 2.0])}
    >>> tx.update({"w": jnp.zeros(2)}, state, moved)[0]["w"]
    Array([1., 0.], dtype=float32)
  """
  _checks.check_hyperparameter(strength, transform=_TRANSFORM, name="strength", low=0.0)

  def init_fn(params):
    plain = _trees.unwrap_variables(params)
    return L2InitState(
      l2_init_anchor=_trees.map_unmasked(lambda p: _trees.fresh(p, jnp.float32), plain)
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args(_TRANSFORM, extra_args)
    del extra_args
    if params is None:
      raise ValueError(f"{_TRANSFORM}: update needs `params` (the penalty pulls them to θ0).")
    params = _trees.unwrap_variables(params)
    ones = jax.tree.map(
      lambda a: a if _trees.is_masked(a) else jnp.ones((), jnp.float32),
      state.l2_init_anchor,
      is_leaf=_trees.is_masked,
    )
    lam = 2.0 * jnp.asarray(strength, jnp.float32)
    return _penalty.add_penalty(updates, params, state.l2_init_anchor, ones, lam, _TRANSFORM), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
