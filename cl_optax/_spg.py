"""SPG parameter importance (Konishi et al., 2023): :func:`spg`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax._batches import Batches, check_batches
from cl_optax._standardize import standardised_tanh

LogitsFn = Callable[[Any, jax.Array, int], jax.Array]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _summed_head_grad(logits_fn, params, xs, ys, head, is_current):
  """Sum over the stacked batches of the gradient of one head's SPG loss."""

  def loss(p, x, y):
    logits = logits_fn(p, x, head)
    if is_current:
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.sum(logits)  # official `OtherTasksLoss`: labels are ignored

  def body(acc, batch):
    g = jax.grad(loss)(params, *batch)
    return optax.tree.add(acc, g), None

  return jax.lax.scan(body, optax.tree.zeros_like(params), (xs, ys))[0]


def spg(
  logits_fn: LogitsFn,
  params: optax.Params,
  batches: Batches,
  *,
  task: int,
) -> optax.Params:
  r"""SPG parameter importance of the task just trained (Konishi et al., 2023).

  For every head :math:`\tau \le t` on the current task's data only:

  .. math::
    G_\tau = \sum_{b} \nabla_\theta L_\tau(b), \quad
    L_t = \mathrm{CE}(f_t(x), y), \quad
    L_{\tau < t} = \textstyle\sum f_\tau(x) \\
    \gamma_\tau = \left|\tanh\!\left(\frac{G_\tau - \mathrm{mean}\,G_\tau}
                       {\mathrm{std}\,G_\tau}\right)\right| \text{ per tensor},
    \qquad \gamma^{t} = \max_{\tau \le t} \gamma_\tau .

  Gradients are *summed* over batches of batch-mean losses (as the official
  code accumulates ``backward()`` over its loader); the standardisation makes
  the result independent of that scale. Pass the result to
  :func:`cl_optax.consolidate` as ``importance=``.

  Departures from the official code: it runs the model in train mode
  (dropout on); here ``logits_fn`` is called as given, so close over a
  dropout key to match it. A tensor with constant gradient gets importance 0
  (the official code divides by a zero std and yields NaN).

  Args:
    logits_fn: ``logits_fn(params, x, head) -> logits`` for task head ``head``
      (a Python int, static under jit).
    params: parameters at the end of task ``task``.
    batches: the task's training data, :class:`cl_optax.importance.Batches`
      ``(x, y)`` with leaves ``[num_batches, batch, ...]`` and labels
      ``[num_batches, batch]``, integer classes of head ``task``; each head's
      gradient is one jitted scan over the batches.
    task: index of the task just trained (its head gets the cross-entropy;
      heads ``0..task-1`` get the sum of their logits).

  Returns:
    A pytree like ``params`` with values in [0, 1].

  References:
    Konishi et al., *Parameter-Level Soft-Masking for Continual Learning*,
    ICML 2023, Eq. 1-3; code UIC-Liu-Lab/SPG ``model_spg.py``
    ``compute_importance`` and ``spg.py`` ``compute_mask``.
  """
  if not isinstance(task, int) or task < 0:
    raise ValueError(f"spg: `task` must be a non-negative int; got {task!r}.")
  batches = check_batches(batches, "spg", labels=True)

  def head_importance(head: int) -> optax.Params:
    grads = _summed_head_grad(logits_fn, params, batches.x, batches.y, head, head == task)
    return jax.tree.map(standardised_tanh, grads)

  gammas = (head_importance(head) for head in range(task + 1))
  return functools.reduce(lambda a, b: jax.tree.map(jnp.maximum, a, b), gammas)
