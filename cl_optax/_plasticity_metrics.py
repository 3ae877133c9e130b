r"""Metrics of the loss-of-plasticity studies: online accuracy and the network's health.

Jittable (``jax.numpy``), so a training scan can record them per task:

- :func:`online_accuracy`: the mean of the correctness of predictions made
  *before* each update, per bin of ``per_bin`` examples (a task).
- :func:`dead_fraction`: the fraction of units never active on a batch.
- :func:`effective_rank`: :math:`\exp(-\sum_k p_k \log p_k)`,
  :math:`p_k = \sigma_k / \sum_j \sigma_j` over the singular values of a
  representation (Roy & Vetterli, 2007, as Dohare et al. plot it).
- :func:`mean_weight_magnitude`: the mean :math:`|w|` over the leaves given.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def online_accuracy(correct: jax.Array, per_bin: int) -> jax.Array:
  """``[n // per_bin]``: mean of ``correct`` (``[n]``, 0/1 or bool) over consecutive bins.

  A trailing partial bin is dropped.

  Example:
    >>> import jax.numpy as jnp
    >>> from cl_optax import metrics
    >>> metrics.online_accuracy(jnp.array([1, 0, 1, 1, 0]), 2)
    Array([0.5, 1. ], dtype=float32)
  """
  correct = jnp.asarray(correct, jnp.float32).reshape(-1)
  n = correct.shape[0] // per_bin
  return correct[: n * per_bin].reshape(n, per_bin).mean(axis=1)


def dead_fraction(activations: jax.Array) -> jax.Array:
  """Fraction of units (last axis) whose activation is 0 on every example of the batch.

  For ReLU units this is Dohare et al.'s "dead units" (a unit is dead when
  it outputs 0 for all inputs of the sample).

  Example:
    >>> import jax.numpy as jnp
    >>> from cl_optax import metrics
    >>> metrics.dead_fraction(jnp.array([[0.0, 1.0], [0.0, 0.0]]))
    Array(0.5, dtype=float32)
  """
  h = activations.reshape(-1, activations.shape[-1])
  return jnp.mean(jnp.all(h == 0, axis=0).astype(jnp.float32))


def effective_rank(activations: jax.Array) -> jax.Array:
  r"""The effective rank of a ``[examples, units]`` representation.

  :math:`\exp(H(p))` with :math:`p = \sigma / \|\sigma\|_1` the normalised
  singular values (terms with :math:`p_k = 0` count 0); between 1 and
  ``min(examples, units)``; 0 for an all-zero matrix.

  Example:
    >>> import jax.numpy as jnp
    >>> from cl_optax import metrics
    >>> round(float(metrics.effective_rank(jnp.eye(3))), 4)
    3.0
  """
  s = jnp.linalg.svd(jnp.asarray(activations, jnp.float32), compute_uv=False)
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def mean_weight_magnitude(params: Any) -> jax.Array:
  """Mean :math:`|w|` over every element of every leaf of ``params`` (pass only the kernels).

  Example:
    >>> import jax.numpy as jnp
    >>> from cl_optax import metrics
    >>> metrics.mean_weight_magnitude({"a": jnp.array([1.0, -3.0]), "b": jnp.array([2.0])})
    Array(2., dtype=float32)
  """
  leaves = jax.tree.leaves(params)
  total = sum(jnp.sum(jnp.abs(x).astype(jnp.float32)) for x in leaves)
  return jnp.asarray(total, jnp.float32) / sum(x.size for x in leaves)
