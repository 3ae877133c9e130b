"""adam_gnt: optax.adam without resets; a reset unit restarts its bias correction (AdamGnT)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax

from conftest import normal_like

LR, B1, B2, EPS = 0.1, 0.9, 0.999, 1e-8


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "l1": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.zeros(4)},
    "l2": {"kernel": jax.random.normal(k[1], (4, 2)), "bias": jax.random.normal(k[2], (2,))},
  }


def test_adam_gnt_equals_optax_adam_without_resets():
  params = _params()
  a, b = cl_optax.adam_gnt(LR), optax.adam(LR)
  sa, sb = a.init(params), b.init(params)
  for i in range(3):
    g = normal_like(params, i)
    ua, sa = a.update(g, sa, params)
    ub, sb = b.update(g, sb, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-9), ua, ub)


def _hand_adam(grads, k_start):
  """Numpy Adam on one entry's gradients from step ``k_start + 1`` with zero moments."""
  m = v = 0.0
  out = []
  for k, g in enumerate(grads, start=k_start + 1):
    m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
    out.append(-LR * (m / (1 - B1**k)) / (np.sqrt(v / (1 - B2**k)) + EPS))
  return np.array(out)


def test_reset_unit_restarts_the_per_element_count_in_continual_backprop():
  params = _params()
  layers = [("l1/kernel", "l1/bias", "l2/kernel", "l2/bias")]
  h = jnp.asarray(np.abs(np.random.default_rng(4).normal(size=(5, 4))), jnp.float32)
  g1, g2 = normal_like(params, 1), normal_like(params, 2)
  got = {}
  for name, inner in (("gnt", cl_optax.adam_gnt(LR)), ("adam", optax.adam(LR))):
    tx = cl_optax.continual_backprop(
      inner, layers=layers, replacement_rate=0.25, maturity_threshold=0
    )
    state = tx.init(params)
    _, state = tx.update(g1, state, params, activations=[h])
    r = np.asarray(state.reset_units[0])
    assert r.sum() == 1  # floor(0.25 * 4)
    u2, state = tx.update(g2, state, params)  # no activations: no reset at step 2
    got[name] = np.asarray(u2["l1"]["kernel"])[:, r][:, 0]
    if name == "gnt":
      count = state.reset_inner_state[0].gnt_count
      np.testing.assert_array_equal(np.asarray(count["l1"]["kernel"])[:, r], 1)
      np.testing.assert_array_equal(np.asarray(count["l1"]["kernel"])[:, ~r], 2)
  g = np.asarray(g2["l1"]["kernel"], np.float64)[:, r][:, 0]
  # AdamGnT: the replaced weights take a fresh Adam's first step, -lr * sign(g) ...
  np.testing.assert_allclose(got["gnt"], [_hand_adam([x], 0)[0] for x in g], rtol=1e-4)
  # ... optax.adam: zero moments but the global count 2 in the bias correction
  np.testing.assert_allclose(got["adam"], [_hand_adam([0.0, x], 0)[1] for x in g], rtol=1e-4)
  assert not np.allclose(got["gnt"], got["adam"])
