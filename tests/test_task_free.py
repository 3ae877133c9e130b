"""Penalties without task boundaries: task_free on a boundary-free regression stream."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

D, STEPS, BATCH, LR = 6, 60, 8, 0.05
W_A = np.array([1.0, -1.0, 2.0, 0.0, 0.0, 0.0])
W_B = np.array([0.0, 0.0, -2.0, 1.0, 1.0, -1.0])


def _stream(seed=0):
  """Two regimes one after the other, no boundary given: A reads inputs 0-2, B inputs 2-5."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(2 * STEPS, BATCH, D))
  xs[:STEPS, :, 3:] = 0.0
  xs[STEPS:, :, :2] = 0.0
  ys = np.concatenate([xs[:STEPS] @ W_A, xs[STEPS:] @ W_B])
  return jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)


def _loss(params, x, y):
  return 0.5 * jnp.mean((x @ params["w"] - y) ** 2)


def _train(tx, signals=True, refresh_at=None):
  xs, ys = _stream()
  params = {"w": jnp.zeros(D)}
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, x, y, refresh):
    g = jax.grad(_loss)(params, x, y)
    extra = {"importance": {"w": jnp.mean(x**2, 0)}} if signals else {}  # the Gaussian Fisher
    u, state = tx.update(g, state, params, refresh=refresh, **extra)
    return optax.apply_updates(params, u), state

  chex.clear_trace_counter()
  for i in range(2 * STEPS):
    params, state = step(params, state, xs[i], ys[i], jnp.asarray(i == refresh_at))
  x_a = np.random.default_rng(1).normal(size=(256, D)) * (np.arange(D) < 3)
  return params, state, float(_loss(params, x_a, x_a @ W_A))


def test_task_free_online_ewc_forgets_less_than_sgd_and_refreshes_on_schedule():
  _, _, sgd_loss = _train(optax.sgd(LR), signals=False)
  inner = cl_optax.online_ewc(5.0, decay=0.9)
  tx = optax.chain(cl_optax.task_free(inner, every=20, signals=["importance"]), optax.sgd(LR))
  params, state, ewc_loss = _train(tx)
  assert int(optax.tree.get(state, "task_free_refreshes")) == 2 * STEPS // 20
  assert ewc_loss < 0.2 * sgd_loss, (ewc_loss, sgd_loss)
  # the last refresh (update 120) anchored at the params given to that update, not the final ones
  anchor = np.asarray(optax.tree.get(state, "online_ewc_anchor")["w"])
  assert not np.allclose(anchor, np.asarray(params["w"]))
  imp = np.asarray(optax.tree.get(state, "online_ewc_importance")["w"])
  assert imp[2] > imp[0] > 0 and imp[3] > 0  # input 2 is used by both regimes


@pytest.mark.parametrize("make", [lambda: cl_optax.si(2.0), lambda: cl_optax.rwalk(2.0)])
def test_task_free_on_a_trigger_for_penalties_without_signals(make):
  tx = optax.chain(cl_optax.task_free(make()), optax.sgd(LR))
  _, state, _ = _train(tx, signals=False, refresh_at=STEPS)
  assert int(optax.tree.get(state, "task_free_refreshes")) == 1
  name = "si_importance" if "si_importance" in str(state) else "rwalk_importance"
  imp = np.asarray(optax.tree.get(state, name)["w"])
  assert imp[:3].max() > 0 and np.all(imp[3:] == imp[3:].min())  # B's inputs were never used
