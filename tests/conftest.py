"""Shared test helpers: small fixed pytrees (few shapes keep JAX compiles few).

Plain functions, imported by the test modules as ``from conftest import ...``:
``make_params`` (the battery's tree), ``normal_like`` / ``uniform_like``
(random leaves shaped like a tree: gradients, directions, importances),
``normal_tree`` (parameters of given shapes), ``psd`` (a random positive
semi-definite matrix) and ``classification_batches`` (stacked inputs and
integer labels).

XLA compiles the suite without most of its optimisation passes (see below).

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

# The suite's programs are small and compiled once or twice each, so XLA's
# optimisation passes cost more time than they save: compile without most of
# them (JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment turns them back on).
# Subprocess tests inherit it; examples and benchmarks run outside pytest keep
# XLA's defaults.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the environment it reads)
import jax.numpy as jnp
import numpy as np
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


def _draw_like(draw, tree, seed, stack=(), dtype=None):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [draw(k, (*stack, *x.shape), dtype or x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def normal_like(tree, seed=1, *, stack=()):
  """Standard-normal leaves shaped and typed like ``tree``'s (arrays or
  ``jax.ShapeDtypeStruct``), one key per leaf; ``stack`` prepends axes."""
  return _draw_like(jax.random.normal, tree, seed, tuple(stack))


def uniform_like(tree, seed=7):
  """float32 uniform [0, 1) leaves shaped like ``tree``'s (an importance), one key per leaf."""
  return _draw_like(jax.random.uniform, tree, seed, dtype=jnp.float32)


def normal_tree(seed, shapes):
  """float32 standard-normal leaves of the given shapes (a pytree of shape tuples)."""
  structs = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda s: isinstance(s, tuple)
  )
  return normal_like(structs, seed)


def psd(seed, n, rank=None):
  """A random [n, n] positive semi-definite float32 numpy matrix of rank ``min(n, rank)``
  (``rank`` defaults to ``2 n``: full rank)."""
  m = np.asarray(jax.random.normal(jax.random.key(seed), (n, rank or 2 * n)))
  return m @ m.T / m.shape[1]


def classification_batches(seed, n_batch, batch, dim, classes):
  """``(xs [n_batch, batch, dim], ys [n_batch, batch])``: normal inputs, uniform labels."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  xs = jax.random.normal(k1, (n_batch, batch, dim))
  ys = jax.random.randint(k2, (n_batch, batch), 0, classes)
  return xs, ys


@pytest.fixture
def params():
  return make_params()
