"""Per-sample gradients of a model output: :func:`output_gradients`, OGD's signal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from cl_optax import _trees


def output_gradients(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  params: optax.Params,
  inputs: jax.Array,
  labels: jax.Array | None = None,
) -> chex.ArrayTree:
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

  _check_inputs(apply_fn, params, inputs, labels)

  def one(x, y):
    def out(p):
      logits = apply_fn(p, x[None])[0]
      return logits.mean() if labels is None else logits[y]

    return jax.grad(out)(params)

  ys = jnp.zeros(inputs.shape[0], jnp.int32) if labels is None else labels
  return jax.jit(jax.vmap(one))(inputs, ys)


def _check_inputs(apply_fn, params, inputs, labels) -> None:
  """Raises a ``ValueError`` naming the argument that does not fit ``[n, ...]`` / ``[n]``."""
  if jnp.ndim(inputs) < 1 or jnp.shape(inputs)[0] == 0:
    raise ValueError(
      f"output_gradients: `inputs` has shape {jnp.shape(inputs)}; expected [n, ...] "
      "with n >= 1 stored samples."
    )
  if labels is None:
    return
  n = jnp.shape(inputs)[0]
  if jnp.shape(labels) != (n,):
    raise ValueError(
      f"output_gradients: `labels` has shape {jnp.shape(labels)}; expected ({n},), one per input."
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(
      f"output_gradients: `labels` has dtype {jnp.result_type(labels)}; expected integer labels."
    )
  classes = jax.eval_shape(apply_fn, params, inputs[:1]).shape[-1]
  if _trees.is_concrete(labels):
    lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
    if lo < 0 or hi >= classes:
      raise ValueError(
        f"output_gradients: `labels` has values in [{lo}, {hi}]; expected values in "
        f"[0, {classes}) (the model's {classes} outputs)."
      )
