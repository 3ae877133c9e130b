"""BiC's bias layer is fitted on held-out data: the validation memory and the training
memory never share an example, and held-out examples weigh nothing in stage 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_optax
from benchmarks import continual
from benchmarks.continual.methods import bic
from benchmarks.continual.registry import Step
from cl_optax import streams


def _blobs(n=160, d=6, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (4, d))
  y = np.repeat(np.arange(4), n // 4)
  return (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32), y


def test_held_out_hash_is_a_fixed_share_and_order_free():
  x = np.random.default_rng(1).random((4000, 12)).astype(np.float32)
  held = np.asarray(bic.held_out(jnp.asarray(x), 0.1))
  assert 0.08 < held.mean() < 0.12
  perm = np.random.default_rng(2).permutation(4000)
  np.testing.assert_array_equal(np.asarray(bic.held_out(jnp.asarray(x[perm]), 0.1)), held[perm])


@pytest.mark.slow  # an end-to-end run of the runner (two tasks)
def test_bic_validation_memory_is_disjoint_from_what_it_trained_on():
  x, y = _blobs()
  make = lambda seed: streams.split(x, y, classes_per_task=2, scenario="class", seed=seed)  # noqa: E731
  cfg = continual.Config((16,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=1, iters=None,
                         hp={"buffer": 40, "val_frac": 0.25}, progress=False, protocol="tiny",
                         scenario="class")  # fmt: skip
  (rec,) = continual.run_method("bic", make, cfg, [0], return_state=True)
  _, _, aux = rec.pop("final_state")
  val, train = aux["val"], aux["memory"]
  assert val.slot_class.shape[0] == 10 and train.slot_class.shape[0] == 30
  vx = np.asarray(val.items[0])[np.asarray(cl_optax.replay.filled(val))]
  tx = np.asarray(train.items[0])[np.asarray(cl_optax.replay.filled(train))]
  assert len(vx) >= 8 and len(tx) >= 24  # both hold items of all four classes
  assert np.all(np.asarray(bic.held_out(jnp.asarray(vx), 0.25)))  # only held-out examples
  assert not np.any(np.asarray(bic.held_out(jnp.asarray(tx), 0.25)))  # none of them
  assert not set(map(bytes, vx)) & set(map(bytes, tx))  # no example in both
  assert float(aux["bias"][0]) != 1.0 or float(aux["bias"][1]) != 0.0  # the bias was fitted


def test_held_out_rows_weigh_nothing_in_stage_one():
  x, y = _blobs(n=16)
  params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)), jnp.float32)}
  aux = bic._bic_init(continual.AuxInit(2, (6,), {"buffer": 20, "val_frac": 0.5}, 4, params))
  held = np.asarray(bic.held_out(jnp.asarray(x), 0.5))
  assert 0 < held.sum() < len(held)

  def loss(xs):
    s = Step(params, jnp.asarray(xs), jnp.asarray(y), jnp.int32(0), 2, aux, jax.random.key(0),
             None, {"memory_batch": 4, "val_frac": 0.5}, lambda p, v: v @ p["w"],
             jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool))  # fmt: skip
    return bic._bic_loss(s, params)

  g = jax.jit(jax.grad(loss))(jnp.asarray(x))
  assert np.all(np.asarray(g)[held] == 0) and np.any(np.asarray(g)[~held] != 0)
