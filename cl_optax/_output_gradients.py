"""Per-sample gradients of a model output: :func:`output_gradients`, OGD's signal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def output_gradients(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  inputs: jax.Array,
  labels: jax.Array | None = None,
) -> Any:
  """Per-sample gradients of a model output, OGD's signal (leaves ``[n, ...]``).

  With ``labels``, the gradient of the ground-truth logit at each sample (the
  paper's "GTL", its default); without, of the mean of the logits ("Avg").

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` for a batch ``x``.
    params: the parameters at the end of the task.
    inputs: ``[n, ...]`` stored samples.
    labels: optional ``[n]`` integer labels.

  Returns:
    A pytree like params whose leaves have a leading axis of size ``n``.
  """

  def one(x, y):
    def out(p):
      logits = apply_fn(p, x[None])[0]
      return logits.mean() if labels is None else logits[y]

    return jax.grad(out)(params)

  ys = jnp.zeros(inputs.shape[0], jnp.int32) if labels is None else labels
  return jax.jit(jax.vmap(one))(inputs, ys)
