r"""Adam with a per-element step count (continual backprop's ``AdamGnT``), for unit resets.

optax's Adam keeps one scalar ``count``: when :func:`cl_optax.unit_resets`
zeroes a replaced unit's ``mu`` and ``nu``, its bias correction still uses
the global step :math:`k`, so its first steps are
:math:`\alpha(1-\beta_1^k)/\sqrt{1-\beta_2^k}` (about 3 :math:`\alpha` for a
large :math:`k`). Here the count is a params-shaped leaf, which the reset
zeroes with the moments, so a replaced weight restarts Adam exactly as
``lop/algos/AdamGnT.py`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks


class AdamGnTState(NamedTuple):
  """State of :func:`scale_by_adam_gnt`.

  Attributes:
    gnt_count: params-shaped int32, updates since each element's (re)start.
    gnt_mu: params-shaped float32 first moment.
    gnt_nu: params-shaped float32 second moment.
  """

  gnt_count: optax.Updates
  gnt_mu: optax.Updates
  gnt_nu: optax.Updates


def scale_by_adam_gnt(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  r"""Adam's scaling with one step count per element (``AdamGnT`` of continual backprop).

  .. math::
    k_i \leftarrow k_i + 1,\quad m_i \leftarrow \beta_1 m_i + (1-\beta_1) g_i,\quad
    v_i \leftarrow \beta_2 v_i + (1-\beta_2) g_i^2,\quad
    u_i = \frac{m_i / (1-\beta_1^{k_i})}{\sqrt{v_i / (1-\beta_2^{k_i})} + \epsilon}

  Equal to ``optax.scale_by_adam`` while no element is reset. Inside
  :func:`cl_optax.continual_backprop` / :func:`cl_optax.redo` (which zero
  every params-shaped leaf of the inner state on reset units) a replaced
  weight's count restarts with its moments. Costs one int32 params-sized
  array more than Adam.

  Args:
    b1, b2, eps: as ``optax.scale_by_adam``.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = cl_optax.adam_gnt(0.1)
    >>> p = {"w": jnp.ones(2)}
    >>> u, s = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init(p), p)
    >>> bool(jnp.allclose(u["w"], jnp.array([-0.1, 0.1])))  # a fresh Adam's first step
    True
  """
  for name, v in (("b1", b1), ("b2", b2)):
    _checks.check_hyperparameter(v, transform="scale_by_adam_gnt", name=name, low=0.0, high=1.0)

  def init_fn(params):
    zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)  # noqa: E731
    return AdamGnTState(zeros(jnp.int32), zeros(jnp.float32), zeros(jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    count = jax.tree.map(lambda k: k + 1, state.gnt_count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.gnt_mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.gnt_nu, updates)

    def step(m, v, k, g):
      k = k.astype(jnp.float32)
      u = (m / (1 - b1**k)) / (jnp.sqrt(v / (1 - b2**k)) + eps)
      return u.astype(g.dtype)

    out = jax.tree.map(step, mu, nu, count, updates)
    return out, AdamGnTState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam_gnt(
  learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """``optax.adam`` with per-element step counts: :func:`scale_by_adam_gnt`, then the learning rate.

  Give it as ``inner`` to :func:`cl_optax.continual_backprop` or
  :func:`cl_optax.redo` to restart a replaced weight's bias correction
  (the official ``AdamGnT``), instead of ``optax.adam`` whose scalar count
  makes a replaced weight's first steps up to about 3× larger.
  """
  return optax.chain(scale_by_adam_gnt(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))
