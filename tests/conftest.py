"""Shared fixtures: small fixed pytrees (few shapes keep JAX compiles few)."""

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_numpy_rank_promotion", "allow")


def make_params(dtype=jnp.float32):
  """Nested dict with a matrix, a vector, a scalar and an empty leaf."""
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {
      "kernel": jax.random.normal(k[0], (4, 3), dtype),
      "bias": jax.random.normal(k[1], (3,), dtype),
    },
    "scale": jnp.asarray(1.5, dtype),
    "empty": jnp.zeros((0, 2), dtype),
    "head": {"kernel": jax.random.normal(k[2], (3, 2), dtype)},
  }


@pytest.fixture
def params():
  return make_params()
