r"""Importance estimators: pure functions ``(fn, params, batches) -> pytree``.

``batches`` is either a stacked pair ``(xs, ys)`` whose arrays carry a
leading number-of-batches axis (scanned inside one jitted call), or any
iterable of ``(x, y)`` pairs (one jitted call per batch, summed on device).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax._das import das_normalize, das_param_importance, das_units  # noqa: F401

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array, int], jax.Array]


def _is_stacked(batches) -> bool:
  return (
    isinstance(batches, tuple | list)
    and len(batches) == 2
    and all(hasattr(b, "ndim") for b in batches)
  )


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


def _standardised_tanh(g: jax.Array) -> jax.Array:
  """``|tanh((g - mean g) / std g)|`` over the whole tensor (unbiased std).

  A tensor whose entries are all equal (all zero, a constant, a scalar) has no
  entry more important than another: it gets 0 instead of the official code's
  NaN (it skips only the all-zero case, where it also gives 0).
  """
  if g.size == 0:
    return jnp.abs(g)
  g = g.astype(jnp.float32)
  centred = g - jnp.mean(g)
  std = jnp.std(g, ddof=1) if g.size > 1 else jnp.zeros((), g.dtype)
  safe = jnp.where(std > 0, std, 1.0)
  return jnp.where(std > 0, jnp.abs(jnp.tanh(centred / safe)), 0.0)


def spg(
  logits_fn: LogitsFn,
  params: PyTree,
  batches: tuple[jax.Array, jax.Array] | Iterable[tuple[jax.Array, jax.Array]],
  *,
  task: int,
) -> PyTree:
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
    batches: the task's training data, stacked ``(xs, ys)`` with shapes
      ``[n_batches, batch, ...]`` and ``[n_batches, batch]``, or an iterable
      of ``(x, y)`` batches. Labels are integer classes of head ``task``.
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
  if _is_stacked(batches):
    stacked = [tuple(jnp.asarray(b) for b in batches)]
  else:
    stacked = [(jnp.asarray(x)[None], jnp.asarray(y)[None]) for x, y in batches]
  if not stacked:
    raise ValueError("spg: `batches` is empty; expected at least one (x, y) batch.")

  importance = None
  for head in range(task + 1):
    grads = None
    for xs, ys in stacked:
      g = _summed_head_grad(logits_fn, params, xs, ys, head, head == task)
      grads = g if grads is None else optax.tree.add(grads, g)
    gamma = jax.tree.map(_standardised_tanh, grads)
    importance = gamma if importance is None else jax.tree.map(jnp.maximum, importance, gamma)
  return importance
