"""Continual states checkpoint with the rest of the optimiser state (orbax)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import cl_optax

from conftest import make_params, uniform_like


@pytest.mark.slow
def test_orbax_round_trip_keeps_importance_and_keeps_working(tmp_path):
  params = make_params()
  del params["empty"]  # orbax refuses zero-size arrays (adam's own state too)
  tx = optax.chain(optax.adam(1e-3), cl_optax.soft_mask(), cl_optax.freeze(threshold=0.5))
  first, second = uniform_like(params, 1), uniform_like(params, 2)
  state = cl_optax.consolidate(tx.init(params), params, importance=first)

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "opt", target=tx.init(params))

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  # The restored state is still a continual state: a second task's importance merges
  # into it by soft_mask's element-wise max and freeze's OR of the thresholded masks.
  restored = cl_optax.consolidate(restored, params, importance=second)
  a, b = (jax.tree.map(np.asarray, t) for t in (first, second))
  want_importance = jax.tree.map(np.maximum, a, b)
  want_frozen = jax.tree.map(lambda x, y: (x >= 0.5) | (y >= 0.5), a, b)
  chex.assert_trees_all_equal(restored[1].importance, want_importance)
  chex.assert_trees_all_equal(restored[2].frozen, want_frozen)
  # Neither task alone gives the merge (the test tells max and OR from "keep one").
  merged, x, y = (
    np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)]) for t in (want_importance, a, b)
  )
  assert not np.array_equal(merged, x) and not np.array_equal(merged, y)
  # And it updates: adam's first step, scaled by 1 - importance, zero where frozen.
  grads = jax.tree.map(jnp.ones_like, params)
  adam_step = -1e-3 / (1 + 1e-8)
  want = jax.tree.map(
    lambda i, f: np.where(f, 0.0, adam_step * (1 - i)), want_importance, want_frozen
  )
  chex.assert_trees_all_close(tx.update(grads, restored, params)[0], want, rtol=1e-5, atol=1e-9)
