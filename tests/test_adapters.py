"""O-LoRA and InfLoRA (cl_optax.adapters) against numpy references and their guarantees.

The shared battery runs both transforms in test_common.py; the fault rows are in
test_faults.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax
from cl_optax import adapters as ad

D, R, S = 6, 2, 3


def _branch(seed=0, filled=1):
  """A branch with ``filled`` random old slots (the rest zero) and random current A, B."""
  rng = np.random.default_rng(seed)
  sa = np.zeros((S, D, R), np.float32)
  sb = np.zeros((S, R, 4), np.float32)
  sa[:filled] = rng.normal(size=(filled, D, R))
  sb[:filled] = rng.normal(size=(filled, R, 4))
  return {
    "lora_a": jnp.asarray(rng.normal(size=(D, R)), jnp.float32),
    "lora_b": jnp.asarray(rng.normal(size=(R, 4)), jnp.float32),
    "lora_slots_a": jnp.asarray(sa),
    "lora_slots_b": jnp.asarray(sb),
  }


def _np_orth(sa, a, form):
  o = np.einsum("sir,ik->srk", sa, a)  # the official A_old A_new^T, Flax orientation
  return np.abs(o).sum() if form == "l1" else (o**2).sum()


def _np_orth_grad(sa, a, form):
  o = np.einsum("sir,ik->srk", sa, a)
  w = np.sign(o) if form == "l1" else 2 * o
  return np.einsum("sir,srk->ik", sa, w)


@pytest.mark.parametrize("form", ["l1", "squared"])
def test_olora_loss_and_gradient_match_numpy(form):
  params = {"q": _branch(1, filled=2), "v": _branch(2, filled=1)}
  want = sum(
    _np_orth(np.asarray(b["lora_slots_a"]), np.asarray(b["lora_a"]), form) for b in params.values()
  )
  np.testing.assert_allclose(ad.olora_orthogonality(params, form), want, rtol=1e-5)
  # the transform adds lambda1 dL_orth/dA + lambda2 A/|A| (and B/|B|) to the gradient
  tx = cl_optax.olora(optax.identity(), orthogonality=0.5, norm=0.1, form=form)
  zero = jax.tree.map(jnp.zeros_like, params)
  got, _ = tx.update(zero, tx.init(params), params)
  for name, b in params.items():
    a, sa, bb = (np.asarray(b[k]) for k in ("lora_a", "lora_slots_a", "lora_b"))
    want_a = 0.5 * _np_orth_grad(sa, a, form) + 0.1 * a / np.linalg.norm(a)
    np.testing.assert_allclose(got[name]["lora_a"], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name]["lora_b"], 0.1 * bb / np.linalg.norm(bb), rtol=1e-5)
    np.testing.assert_array_equal(got[name]["lora_slots_a"], 0.0)  # old slots frozen
    np.testing.assert_array_equal(got[name]["lora_slots_b"], 0.0)


def test_lora_apply_and_write_slot_match_numpy():
  br = _branch(3, filled=1)
  x = np.random.default_rng(4).normal(size=(5, D)).astype(np.float32)
  n = {k: np.asarray(v) for k, v in br.items()}
  want = 2.0 * (x @ n["lora_a"] @ n["lora_b"] + x @ n["lora_slots_a"][0] @ n["lora_slots_b"][0])
  np.testing.assert_allclose(ad.lora_apply(br, jnp.asarray(x), 2.0), want, rtol=1e-5, atol=1e-5)
  out = ad.lora_write_slot(br, 1, jax.random.key(0))
  np.testing.assert_array_equal(out["lora_slots_a"][1], n["lora_a"])
  np.testing.assert_array_equal(out["lora_slots_b"][1], n["lora_b"])
  np.testing.assert_array_equal(out["lora_slots_a"][0], n["lora_slots_a"][0])
  np.testing.assert_array_equal(out["lora_b"], 0.0)
  assert np.abs(np.asarray(out["lora_a"])).max() <= 1 / np.sqrt(D)  # kaiming_uniform(a=sqrt 5)


def test_olora_boundary_writes_slot_resets_moments_and_orthogonal_term_is_live():
  """Task 0 trains, the boundary stores its adapter in slot 0 (through the next step's
  update, Adam's moments of the written entries reset); from task 1 on the orthogonal
  term is non-zero and moves the new A (a rerun of the official code logged it as 0.0)."""
  br = _branch(5, filled=0)
  params = {"base": jnp.ones((D, 4)), "q": br}
  tx = cl_optax.olora(optax.adam(0.1), orthogonality=0.5)
  state = tx.init(params)
  assert float(ad.olora_orthogonality(params)) == 0.0  # no old slot yet
  state = cl_optax.consolidate(state, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["q"]["lora_slots_a"][0], br["lora_a"], atol=1e-6)
  np.testing.assert_allclose(new["q"]["lora_slots_b"][0], br["lora_b"], atol=1e-6)
  np.testing.assert_array_equal(new["q"]["lora_slots_a"][1:], 0.0)
  np.testing.assert_array_equal(new["q"]["lora_b"], 0.0)
  assert np.abs(np.asarray(new["q"]["lora_a"] - br["lora_a"])).min() > 0  # re-drawn
  mu = state.olora_inner_state[0].mu
  np.testing.assert_array_equal(mu["q"]["lora_a"], 0.0)  # moments of the new adapter reset
  assert np.all(np.asarray(mu["base"]) != 0)  # the others kept
  assert float(ad.olora_orthogonality(new)) > 0.0
  off = cl_optax.olora(optax.identity(), orthogonality=0.0)
  on = cl_optax.olora(optax.identity(), orthogonality=0.5)
  zero = jax.tree.map(jnp.zeros_like, new)
  g_on = on.update(zero, on.init(new), new)[0]["q"]["lora_a"]
  g_off = off.update(zero, off.init(new), new)[0]["q"]["lora_a"]
  assert float(jnp.abs(g_on - g_off).sum()) > 0.0


def _np_grow_first(cov, eps):
  """GPM's first-task rule on a covariance: the smallest k whose energy reaches eps."""
  w, v = np.linalg.eigh(cov)
  w, v = w[::-1], v[:, ::-1]
  k = int(np.searchsorted(np.cumsum(w) / w.sum(), eps - 1e-6) + 1)
  return v[:, :k]


def _np_design(m, cov, r):
  p = np.eye(cov.shape[0]) - m @ m.T
  u = np.linalg.svd(p @ cov)[0]
  return u[:, :r] / np.sqrt(3)


def _proj(a):
  q = np.linalg.qr(np.asarray(a, np.float64))[0]
  return q @ q.T


def _cov(seed, d, dirs):
  """A covariance of inputs in the span of the first ``dirs`` axes of a random rotation."""
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.normal(size=(d, d)))[0]
  x = rng.normal(size=(200, dirs)) * np.linspace(2.0, 1.0, dirs)
  x = x @ q[:, :dirs].T
  return (x.T @ x / len(x)).astype(np.float32), q[:, :dirs]


def test_inflora_design_and_growth_match_numpy_first_task_branch_at_small_d():
  """d = 4 and a first task using 3 input directions (k >= d / 2): the official code
  stores that *old-space* basis labelled "retain", so task 1's design would keep the
  old space (the numpy emulation below). Here task 1's design is orthogonal to it."""
  d = 4
  c0, span0 = _cov(0, d, 3)
  c1, _ = _cov(1, d, d)
  params = {"k": ad.lora_init(jax.random.key(0), d, 3, rank=1, slots=2)}
  tx = cl_optax.inflora(optax.sgd(0.1), threshold_begin=0.99, threshold_end=1.0)
  state = cl_optax.consolidate(tx.init(params), params, next_covariance={"k": c0})
  params, state = cl_optax.apply_pending_writes(params, state)
  a0 = np.asarray(params["k"]["lora_a"])
  np.testing.assert_allclose(_proj(a0), _proj(_np_design(np.zeros((d, 0)), c0, 1)), atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(a0), 1 / np.sqrt(3), rtol=1e-5)
  state = cl_optax.consolidate(state, params, covariance={"k": c0}, next_covariance={"k": c1})
  m = _np_grow_first(c0, 0.99)  # eps_0 = eps_b at t = 0
  assert m.shape[1] == 3 >= d / 2
  assert int(state.inflora_count["k"]) == 3
  basis = np.asarray(state.inflora_basis["k"])[:, :3]
  np.testing.assert_allclose(_proj(basis), _proj(span0), atol=1e-4)
  params, state = cl_optax.apply_pending_writes(params, state)
  a1 = np.asarray(params["k"]["lora_a"])
  np.testing.assert_allclose(_proj(a1), _proj(_np_design(m, c1, 1)), atol=1e-4)
  assert np.abs(span0.T @ a1).max() < 1e-5  # the old space removed
  buggy = np.linalg.svd(m @ m.T @ c1)[0][:, :1]  # the code's "retain" of the old-space basis
  assert np.abs(span0.T @ buggy).max() > 0.5
  np.testing.assert_allclose(params["k"]["lora_slots_a"][0], a0)  # task 0 in slot 0


def test_inflora_old_task_outputs_unchanged_after_sgd_on_a_new_branch():
  """The method's guarantee: task 1's up-projection trained with plain SGD leaves the
  outputs on task 0's inputs unchanged (to 1e-6), the base layer frozen."""
  rng = np.random.default_rng(7)
  c0, span0 = _cov(2, D, 2)
  x0 = jnp.asarray(rng.normal(size=(16, 2)) @ span0.T, jnp.float32)
  x1 = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, 3)), jnp.float32)
  params = {"k": ad.lora_init(jax.random.key(1), D, 3, rank=R, slots=S)}
  tx = cl_optax.inflora(optax.sgd(0.5), 1.0, 1.0)

  def out(p, x):
    return x @ w + ad.lora_apply(p["k"], x, 2.0)

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(lambda p: jnp.mean((out(p, x) - y) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def train(p, s, x, y):
    for _ in range(5):
      p, s = step(p, s, x, y)
    return p, s

  state = cl_optax.consolidate(tx.init(params), params, next_covariance={"k": c0})
  params, state = cl_optax.apply_pending_writes(params, state)
  params, state = train(params, state, x0, jnp.ones((16, 3)))
  before = out(params, x0)
  c1 = ad.input_covariance(x1)
  sig = {"covariance": {"k": ad.input_covariance(x0)}, "next_covariance": {"k": c1}}
  state = cl_optax.consolidate(state, params, **sig)
  params, state = train(params, state, x1, -jnp.ones((16, 3)))
  assert float(jnp.abs(params["k"]["lora_b"]).max()) > 1e-2  # task 1 trained
  np.testing.assert_allclose(out(params, x0), before, atol=1e-6)


def test_inflora_threshold_schedule():
  """eps_t = eps_b + (eps_e - eps_b) t / T: with eps_b = 0.5 the first task keeps one
  direction of a 2-direction covariance (energies 0.8, 0.2); with eps_b = 0.9, two."""
  c = np.diag([0.8, 0.2, 0.0, 0.0]).astype(np.float32)
  params = {"k": ad.lora_init(jax.random.key(0), 4, 2, rank=1, slots=2)}
  counts = []
  for eps_b in (0.5, 0.9):
    tx = cl_optax.inflora(optax.sgd(0.1), eps_b, 1.0)
    state = cl_optax.consolidate(tx.init(params), params, next_covariance={"k": c})
    state = cl_optax.consolidate(state, params, covariance={"k": c}, next_covariance={"k": c})
    counts.append(int(state.inflora_count["k"]))
  assert counts == [1, 2]


def test_adapter_leaves_take_other_transforms_through_selectors():
  """DAS (a per-unit soft mask) and EWC reach the adapter leaves through optax.masked
  labels, as any other leaves; the base and the slots pass unchanged."""
  params = {"q": _branch(8), "base": jnp.ones((D, 4))}
  only_b = {"q": {k: k == "lora_b" for k in params["q"]}, "base": False}
  units = lambda p: jax.tree.map(lambda x: x.shape[-1:], p)  # noqa: E731  (DAS: per unit)
  das = optax.masked(cl_optax.soft_mask(importance_shapes=units), only_b)
  unit = jnp.array([0.0, 0.5, 1.0, 0.25])
  imp = jax.tree.map(lambda p: jnp.full(p.shape[-1:], 0.3), params)
  imp["q"]["lora_b"] = unit
  state = cl_optax.consolidate(das.init(params), params, importance=imp)
  g = jax.tree.map(jnp.ones_like, params)
  u, _ = das.update(g, state, params)
  np.testing.assert_allclose(u["q"]["lora_b"], jnp.broadcast_to(1.0 - unit, (R, 4)))
  np.testing.assert_array_equal(u["base"], 1.0)
  ewc = optax.masked(cl_optax.ewc(2.0), only_b)
  fisher = jax.tree.map(jnp.ones_like, params)
  state = cl_optax.consolidate(ewc.init(params), params, importance=fisher)
  moved = jax.tree.map(lambda p: p + 1.0, params)
  u, _ = ewc.update(jax.tree.map(jnp.zeros_like, params), state, moved)
  np.testing.assert_allclose(u["q"]["lora_b"], 2.0, rtol=1e-6)
  np.testing.assert_array_equal(u["q"]["lora_a"], 0.0)


def test_slots_full_and_missing_branch_leaf_raise():
  params = {"k": ad.lora_init(jax.random.key(0), 3, 2, rank=1, slots=1)}
  tx = cl_optax.olora(optax.sgd(0.1))
  state = cl_optax.consolidate(tx.init(params), params)
  with pytest.raises(ValueError, match="all 1 adapter slots are taken"):
    cl_optax.consolidate(state, params)
  bad = {"k": {k: v for k, v in params["k"].items() if k != "lora_slots_b"}}
  with pytest.raises(ValueError, match=r"'k' lacks the leaves \['lora_slots_b'\]"):
    tx.init(bad)
