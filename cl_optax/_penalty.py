r"""Shared pieces of the quadratic-penalty transforms (EWC, online EWC, MAS, SI).

Each adds :math:`\lambda\,\Omega \odot (\theta - \theta^*)` to the gradient; the
anchor :math:`\theta^*` is kept in float32 and owns its buffers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees


def f32_like(template: Any, tree: Any) -> Any:
  """Float32 copies of the leaves of ``tree`` where ``template`` is not masked."""
  return _trees.map_unmasked(lambda t, x: _trees.fresh(x, jnp.float32), template, tree)


def zeros(params: Any, dtype: Any = None) -> Any:
  """Zeros like ``params`` in ``dtype`` (float32 when ``None``)."""
  return optax.tree.zeros_like(params, jnp.float32 if dtype is None else dtype)


def copy_f32(params: Any) -> Any:
  """A float32 copy of ``params`` that owns its buffers (an anchor)."""
  return jax.tree.map(lambda p: _trees.fresh(p, jnp.float32), params)


def importance_signal(anchor, params, signals, transform):
  """Validated ``importance`` and params, cut to the structure of ``anchor``."""
  new = _checks.validated_signal(
    signals, "importance", anchor, transform=transform, values="nonnegative"
  )
  params = _trees.restrict_like(anchor, params, transform=transform, name="params")
  return f32_like(anchor, new), f32_like(anchor, params)


def add_penalty(updates, params, anchor, omega, strength, transform):
  """``updates + strength * omega * (params - anchor)`` in the updates' dtypes."""
  if params is None:
    raise ValueError(f"{transform}: update needs `params` (the penalty pulls them to the anchor).")
  _checks.check_updates(updates, anchor, transform=transform)
  _checks.check_updates(params, anchor, transform=transform, name="params")
  lam = jnp.asarray(strength, jnp.float32)

  def add(u, p, a, o):
    pen = lam * o.astype(jnp.float32) * (jnp.asarray(p, jnp.float32) - a)
    return (u.astype(jnp.float32) + pen).astype(u.dtype)

  return _trees.map_unmasked(add, updates, params, anchor, omega)


def penalty_update(anchor: str, importance: str, strength, transform: str):
  """``update_fn`` adding ``strength * state.<importance> * (params - state.<anchor>)``."""

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args(transform, extra_args)
    del extra_args
    omega = getattr(state, importance)
    return add_penalty(updates, params, getattr(state, anchor), omega, strength, transform), state

  return update_fn
