"""Shared fixtures: small fixed pytrees (few shapes keep JAX compiles few).

Hypothesis profiles: ``ci``, loaded when ``$CI`` is set to anything but
``""``, ``0`` or ``false`` (CI services set ``CI=true``), derandomises every
property test, so a boundary bug fails on every run or on none; ``dev`` (the
default) draws fresh examples each run. ``HYPOTHESIS_PROFILE=<name>`` picks
one explicitly. Test modules set only ``deadline`` and ``max_examples`` in
their ``@settings``; the rest comes from the loaded profile (a ``settings``
object inherits from the profile loaded when it is created, and this file is
imported before any test module).
"""

import os

import jax
import jax.numpy as jnp
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_rank_promotion", "allow")

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)


def _profile() -> str:
  if "HYPOTHESIS_PROFILE" in os.environ:
    return os.environ["HYPOTHESIS_PROFILE"]
  on_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")
  return "ci" if on_ci else "dev"


settings.load_profile(_profile())


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
