"""Continual states checkpoint with the rest of the optimiser state (orbax)."""

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import cl_optax

from conftest import make_params


def test_orbax_round_trip_keeps_importance_and_keeps_working(tmp_path):
  params = make_params()
  del params["empty"]  # orbax refuses zero-size arrays (adam's own state too)
  tx = optax.chain(optax.adam(1e-3), cl_optax.soft_mask(), cl_optax.freeze())
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 0.75), params)
  state = cl_optax.consolidate(tx.init(params), params, importance=imp)

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "opt", target=tx.init(params))

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  # The restored state is still a continual state: it consolidates and updates.
  restored = cl_optax.consolidate(restored, params, importance=imp)
  grads = jax.tree.map(jnp.ones_like, params)
  chex.assert_trees_all_close(
    tx.update(grads, restored, params)[0], tx.update(grads, state, params)[0]
  )
