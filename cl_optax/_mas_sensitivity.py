"""MAS parameter importance (Aljundi et al., 2018): :func:`mas_sensitivity`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax._batches import Batches, check_batches, scan_mean


@functools.partial(jax.jit, static_argnums=(0,))
def _mas_batch(fn, params, x):
  def one(xi):
    g = jax.grad(lambda p: jnp.sum(jnp.square(fn(p, xi[None]).astype(jnp.float32))))(params)
    return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), g)

  return jax.tree.map(lambda g: jnp.sum(g, 0), jax.vmap(one)(x))


def mas_sensitivity(
  fn: Callable[[Any, jax.Array], jax.Array], params: optax.Params, batches: Batches
) -> optax.Params:
  r"""MAS importance (Aljundi et al., 2018): the output's mean sensitivity to each parameter.

  .. math::
    \Omega = \frac{1}{N} \sum_n \left| \nabla_\theta \, \| f(x_n; \theta) \|_2^2 \right|

  per example (``jax.vmap``), as in the paper's Eq. 2-4. (Avalanche / FACIL
  take the absolute value of the gradient of the *batch-mean*, un-squared norm
  instead; this follows the paper.) Unsupervised: labels are ignored.

  Args:
    fn: ``fn(params, x) -> outputs`` ``[batch, ...]`` (the logits, pre-softmax).
    params: the parameters at the end of the task.
    batches: :class:`cl_optax.importance.Batches` ``(x, y)``, leaves
      ``[num_batches, batch, ...]``, scanned in one jitted call (``y`` is
      ignored and may be ``None``: ``Batches(tokens)``).

  Returns:
    A float32 pytree like ``params``: the ``importance=`` of :func:`cl_optax.mas`.

  References:
    Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars, *Memory Aware Synapses:
    Learning what (not) to forget*, ECCV 2018, Eq. 4.
  """
  return _mas_scan(fn, params, check_batches(batches, "mas_sensitivity"))


@functools.partial(jax.jit, static_argnums=(0,))
def _mas_scan(fn, params, batches):
  return scan_mean(lambda i, x, y: _mas_batch(fn, params, x), batches)
