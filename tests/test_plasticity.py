"""The plasticity transforms against plain-numpy references (tiny shapes, few steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax
from cl_optax._unit_resets import UnitLayer

from conftest import normal_like


def _mlp(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  n = jax.random.normal
  return {
    "l1": {"kernel": n(k[0], (3, 4)), "bias": n(k[1], (4,))},
    "l2": {"kernel": n(k[2], (4, 4)), "bias": n(k[3], (4,))},
    "out": {"kernel": n(k[4], (4, 2)), "bias": n(k[5], (2,))},
  }


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ------------------------------------------------------------------- L2 Init
def test_l2_init_matches_numpy_and_keeps_its_anchor():
  params0 = _mlp()
  tx = cl_optax.l2_init(0.3)
  state = tx.init(params0)
  params = normal_like(params0, 4)
  grads = normal_like(params0, 5)
  state = cl_optax.consolidate(state, params)  # no boundary rule: anchor stays theta_0
  got, state = tx.update(grads, state, params)
  want = jax.tree.map(lambda g, p, a: g + 2 * 0.3 * (p - a), _np(grads), _np(params), _np(params0))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), got, want)
  jax.tree.map(np.testing.assert_array_equal, state.l2_init_anchor, params0)


# ----------------------------------------------------------- shrink & perturb
@pytest.mark.slow
def test_shrink_perturb_writes_shrink_theta_plus_perturb_fresh():
  params = _mlp()
  fresh = _mlp(7)
  tx = optax.chain(optax.adam(0.1), cl_optax.shrink_perturb())  # defaults 0.4, 0.1
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, fresh=fresh)
  # apply at once and through the next step: the same parameters, bitwise
  now, _ = cl_optax.apply_pending_writes(params, state)
  updates, state = tx.update(normal_like(params, 3), state, params)
  got = optax.apply_updates(params, updates)
  jax.tree.map(np.testing.assert_array_equal, got, now)
  want = jax.tree.map(
    lambda p, f: np.float32(0.4) * np.asarray(p) + np.float32(0.1) * np.asarray(f), params, fresh
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=0, atol=2 * np.spacing(np.abs(w).max()))
  # nothing pending afterwards: the next step is an ordinary Adam step
  assert not bool(state[1].shrink_perturb_write.write_pending)


def test_shrink_perturb_restarts_the_inner_optimiser():
  params = _mlp()
  tx = cl_optax.shrink_perturb(0.5, 0.25, inner=optax.adam(0.1))
  state = tx.init(params)
  for i in range(2):
    _, state = tx.update(normal_like(params, i), state, params)
  assert int(state.shrink_perturb_inner[0].count) == 2
  state = cl_optax.consolidate(state, params, fresh=_mlp(7))
  updates, state = tx.update(normal_like(params, 3), state, params)
  new = optax.apply_updates(params, updates)
  adam = optax.adam(0.1)
  jax.tree.map(np.testing.assert_array_equal, state.shrink_perturb_inner, adam.init(new))
  # the step after is a fresh Adam's first step
  g = normal_like(params, 4)
  got, _ = tx.update(g, state, new)
  want, _ = adam.update(g, adam.init(new), new)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_param_noise_is_dohares_shrink_and_perturb():
  params = {"w": jnp.linspace(-1.0, 1.0, 2000), "b": jnp.ones(3)}
  lr, wd, sigma = 0.003, 1e-4, 1e-2
  tx = optax.chain(
    optax.add_decayed_weights(wd), optax.sgd(lr), cl_optax.param_noise(sigma, seed=4)
  )
  grads = normal_like(params, 2)
  updates, _ = tx.update(grads, tx.init(params), params)
  # the documented key scheme
  _, sub = jax.random.split(jax.random.PRNGKey(4))
  keys = jax.random.split(sub, 2)  # leaves in tree order: "b", "w"
  eps = {
    k: np.asarray(sigma * jax.random.normal(key, params[k].shape))
    for k, key in zip(("b", "w"), keys, strict=True)
  }
  p, g = _np(params), _np(grads)
  for k in ("b", "w"):
    want = (1 - lr * wd) * p[k] - lr * g[k] + eps[k]
    np.testing.assert_allclose(p[k] + np.asarray(updates[k]), want, rtol=1e-5, atol=1e-6)
  noise = np.asarray(updates["w"]) - (-lr * wd * p["w"] - lr * g["w"])
  assert abs(noise.std() - sigma) < 0.1 * sigma and abs(noise.mean()) < 0.1 * sigma


# ----------------------------------------------------------------------- ReDo
def _redo_score(h, centered):
  h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  if centered:
    h = h - h.mean(0)
  s = np.abs(h).mean(0)
  return s / (s.mean() + 1e-9)


@pytest.mark.parametrize("centered", [False, True])
def test_redo_selector_score_is_dopamines(centered):
  h = np.abs(np.random.default_rng(0).normal(size=(2, 3, 5))).astype(np.float32)
  h[..., 1] = 0.2  # constant: dormant once centred
  sel = cl_optax.redo_selector(0.3, every=2, centered=centered)
  layer = None
  s, eligible, _ = sel.score((), jnp.asarray(h), layer, jnp.asarray(1))
  np.testing.assert_allclose(s, _redo_score(h, centered), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(eligible, _redo_score(h, centered) <= 0.3)
  _, eligible, _ = sel.score((), jnp.asarray(h), layer, jnp.asarray(0))  # not a period step
  assert not bool(jnp.any(eligible))


def test_redo_recycles_dormant_units_and_their_adam_moments():
  params = _mlp()
  layers = [("l1/kernel", "l1/bias", "l2/kernel")]
  tx = cl_optax.redo(optax.adam(0.1), layers=layers, threshold=0.1, every=2, seed=5)
  state = tx.init(params)
  h = np.abs(np.random.default_rng(1).normal(size=(6, 4))).astype(np.float32)
  h[:, 2] = 0.0  # dead
  h[:, 0] = 0.01  # dormant: score about 0.013 <= 0.1
  grads = normal_like(params, 1)
  updates, state = tx.update(grads, state, params, activations=[jnp.asarray(h)])
  assert not bool(state.reset_units[0].any())  # step 1 of every=2: no recycle
  params = optax.apply_updates(params, updates)
  key = state.reset_key
  updates, state = tx.update(grads, state, params, activations=[jnp.asarray(h)])
  new = optax.apply_updates(params, updates)
  dormant = np.array([True, False, True, False])
  np.testing.assert_array_equal(state.reset_units[0], dormant)
  _, sub = jax.random.split(key)
  draw = jax.nn.initializers.xavier_uniform()(jax.random.split(sub, 1)[0], (3, 4), jnp.float32)
  np.testing.assert_allclose(new["l1"]["kernel"][:, dormant], draw[:, dormant], atol=1e-6)
  np.testing.assert_array_equal(new["l1"]["bias"][dormant], 0.0)
  np.testing.assert_array_equal(new["l2"]["kernel"][dormant], 0.0)
  mu, nu = state.reset_inner_state[0].mu, state.reset_inner_state[0].nu
  for m in (mu, nu):
    np.testing.assert_array_equal(m["l1"]["kernel"][:, dormant], 0.0)
    np.testing.assert_array_equal(m["l1"]["bias"][dormant], 0.0)
    np.testing.assert_array_equal(m["l2"]["kernel"][dormant], 0.0)
    assert np.all(np.asarray(m["l2"]["kernel"][~dormant]) != 0.0)
  assert int(state.reset_inner_state[0].count) == 2  # count kept


# ------------------------------------------------------- continual backprop
class _NumpyCBP:
  """``lop/algos/gnt.py`` ``test_features`` (accumulate=True) with Flax kernels [in, out]."""

  def __init__(self, n, rate, eta, m, max_units):
    self.u, self.f = np.zeros(n), np.zeros(n)
    self.age, self.acc = np.zeros(n), 0.0
    self.rate, self.eta, self.m, self.k_max = rate, eta, m, max_units

  def step(self, h, w_in, w_out):
    eta = self.eta
    self.age += 1
    c = 1 - eta**self.age
    self.f = eta * self.f + (1 - eta) * h.mean(0)
    f_hat = self.f / c
    y = np.abs(w_out).mean(1) * np.abs(h - f_hat).mean(0) / np.abs(w_in).mean(0)
    self.u = eta * self.u + (1 - eta) * y
    u_hat = self.u / c
    mature = np.flatnonzero(self.age > self.m)
    self.acc += self.rate * len(mature)
    k = min(int(self.acc), self.k_max)
    self.acc -= k
    chosen = mature[np.argsort(u_hat[mature], kind="stable")[:k]]
    reset = np.zeros(len(self.u), bool)
    reset[chosen] = True
    return reset, f_hat

  def reset(self, r):
    self.u[r], self.f[r], self.age[r] = 0.0, 0.0, 0.0


def test_continual_backprop_matches_numpy_generate_and_test():
  params = _mlp()
  layers = [
    ("l1/kernel", "l1/bias", "l2/kernel", "l2/bias"),
    ("l2/kernel", "l2/bias", "out/kernel", "out/bias"),
  ]
  rate, eta, m, k_max = 0.37, 0.9, 1, 2  # n_l stays off integers (float32 vs float64)
  tx = cl_optax.continual_backprop(
    optax.sgd(0.1),
    layers=layers,
    replacement_rate=rate,
    decay_rate=eta,
    maturity_threshold=m,
    max_units=k_max,
    seed=2,
  )
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, h: tx.update(g, s, p, activations=h))
  refs = [_NumpyCBP(4, rate, eta, m, k_max) for _ in layers]
  rng = np.random.default_rng(3)
  resets_seen = 0
  for t in range(5):
    hs = [np.abs(rng.normal(size=(5, 4))).astype(np.float32) for _ in layers]
    grads = normal_like(params, 10 + t)
    after = _np(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    outs = [
      ref.step(h.astype(np.float64), after[a]["kernel"], after[b]["kernel"])
      for ref, h, (a, b) in zip(refs, hs, (("l1", "l2"), ("l2", "out")), strict=True)
    ]
    key = state.reset_key
    updates, state = step(grads, state, params, [jnp.asarray(h) for h in hs])
    new = _np(optax.apply_updates(params, updates))
    _, sub = jax.random.split(key)
    keys = jax.random.split(sub, 2)
    # the writes, layer by layer, in order (layer 2's draw overrides layer 1's zero rows)
    want = jax.tree.map(np.copy, after)
    for li, ((r, f_hat), (a, b)) in enumerate(zip(outs, (("l1", "l2"), ("l2", "out")))):
      np.testing.assert_array_equal(state.reset_units[li], r)
      draw = np.asarray(jax.nn.initializers.he_uniform()(keys[li], (4 if li else 3, 4)))
      want[a]["kernel"][:, r] = draw[:, r]
      want[a]["bias"][r] = 0.0
      want[b]["bias"] += (want[b]["kernel"][r] * f_hat[r, None]).sum(0)
      want[b]["kernel"][r] = 0.0
      resets_seen += int(r.sum())
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), new, want)
    for ref, r, st in zip(refs, state.reset_units, state.reset_stats, strict=True):
      ref.reset(np.asarray(r))
      np.testing.assert_allclose(st.cbp_utility, ref.u, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(st.cbp_mean_output, ref.f, rtol=1e-4, atol=1e-6)
      np.testing.assert_array_equal(st.cbp_age, ref.age)
      np.testing.assert_allclose(st.cbp_accumulator, ref.acc, rtol=1e-5, atol=1e-6)
    params = optax.apply_updates(params, updates)
  assert resets_seen > 0


def test_continual_backprop_contribution_utility():
  sel = cl_optax.cbp_selector(0.0, 0.5, 0, utility="contribution")
  st = sel.init(3)
  h = jnp.array([[1.0, -2.0, 0.5], [3.0, 2.0, 0.5]])
  w_in, w_out = jnp.ones((2, 3)), jnp.array([[1.0, 2.0], [0.0, 4.0], [1.0, 1.0]])
  score, eligible, st = sel.score(st, h, UnitLayer(w_in, None, w_out), jnp.asarray(0))
  y = np.abs(np.asarray(w_out)).mean(1) * np.abs(np.asarray(h)).mean(0)
  np.testing.assert_allclose(score, y, rtol=1e-6)  # u_hat = y after one step
  assert not bool(eligible.any())  # rate 0


def test_continual_backprop_zeroes_adam_moments_but_not_the_next_bias():
  params = _mlp()
  layers = [("l1/kernel", "l1/bias", "l2/kernel", "l2/bias")]
  tx = cl_optax.continual_backprop(
    optax.adam(0.1), layers=layers, replacement_rate=0.3, maturity_threshold=0
  )
  state = tx.init(params)
  h = jnp.asarray(np.abs(np.random.default_rng(4).normal(size=(5, 4))), jnp.float32)
  updates, state = tx.update(normal_like(params, 1), state, params, activations=[h])
  r = np.asarray(state.reset_units[0])
  assert r.sum() == 1  # floor(0.3 * 4) = 1
  adam = state.reset_inner_state[0]
  for m in (adam.mu, adam.nu):
    np.testing.assert_array_equal(m["l1"]["kernel"][:, r], 0.0)
    np.testing.assert_array_equal(m["l1"]["bias"][r], 0.0)
    np.testing.assert_array_equal(m["l2"]["kernel"][r], 0.0)
    assert np.all(np.asarray(m["l2"]["bias"]) != 0.0)
    assert np.all(np.asarray(m["l1"]["kernel"][:, ~r]) != 0.0)
  assert int(adam.count) == 1
  assert int(state.reset_stats[0].cbp_age[r][0]) == 0
