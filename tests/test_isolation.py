"""HAT, PackNet and WSN against numpy references (loops, the papers' equations, autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax


def _mlp():
  k = jax.random.split(jax.random.key(0), 6)
  return {
    "l1": {"kernel": jax.random.normal(k[0], (5, 4)), "bias": jax.random.normal(k[1], (4,))},
    "l2": {"kernel": jax.random.normal(k[2], (4, 3)), "bias": jax.random.normal(k[3], (3,))},
    "emb": {"l1": jax.random.normal(k[4], (2, 4)), "l2": jax.random.normal(k[5], (2, 3))},
    "head": jnp.ones((2, 3, 2)),
  }


def _ones(p):
  return jax.tree.map(jnp.ones_like, p)


# ------------------------------------------------------------------ HAT
def test_hat_masks_kernels_by_the_outer_min_and_biases_by_the_output_gate():
  params = _mlp()
  tx = cl_optax.hat(["l1", "l2"])
  rng = np.random.default_rng(0)
  a1, a2 = rng.uniform(size=4).astype(np.float32), rng.uniform(size=3).astype(np.float32)
  b1 = rng.uniform(size=4).astype(np.float32)
  state = cl_optax.consolidate(tx.init(params), params, gates=[a1, a2])
  state = cl_optax.consolidate(state, params, gates=(b1, np.zeros(3, np.float32)))
  A1, A2 = np.maximum(a1, b1), a2
  out, _ = jax.jit(tx.update)(_ones(params), state, params)
  want2 = np.empty((4, 3), np.float32)
  for i in range(4):
    for j in range(3):
      want2[i, j] = 1.0 - min(A1[i], A2[j])
  np.testing.assert_allclose(out["l2"]["kernel"], want2, rtol=1e-6)
  np.testing.assert_allclose(out["l1"]["kernel"], np.broadcast_to(1.0 - A1, (5, 4)), rtol=1e-6)
  np.testing.assert_allclose(out["l2"]["bias"], 1.0 - A2, rtol=1e-6)
  np.testing.assert_array_equal(out["head"], 1.0)  # not selected: unmasked
  assert int(state.hat_task) == 2


def test_hat_nhwc_flatten_and_out_in_orientation():
  """A dense layer after a conv takes A_conv tiled over (H, W) (channel fastest)."""
  k = jax.random.split(jax.random.key(1), 2)
  params = {
    "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4))},
    "fc": {"weight": jax.random.normal(k[1], (3, 2 * 2 * 4))},  # [out, in]
  }
  tx = cl_optax.hat(["conv", "fc"])
  a_c, a_f = np.array([0.0, 1.0, 0.3, 0.9], np.float32), np.array([1.0, 0.2, 0.0], np.float32)
  state = cl_optax.consolidate(tx.init(params), params, gates=[a_c, a_f])
  out, _ = jax.jit(tx.update)(_ones(params), state, params)
  channel = np.arange(16).reshape(2, 2, 4)  # a [H, W, C] map, flattened row-major
  chan_of = np.empty(16, int)
  chan_of[channel.ravel()] = np.broadcast_to(np.arange(4), (2, 2, 4)).ravel()
  want = np.array([[1.0 - min(a_f[o], a_c[chan_of[i]]) for i in range(16)] for o in range(3)])
  np.testing.assert_allclose(out["fc"]["weight"], want, rtol=1e-6)
  np.testing.assert_allclose(out["conv"]["kernel"], np.broadcast_to(1.0 - a_c, (3, 3, 2, 4)))


def test_hat_gate_gradient_is_the_official_compensation():
  e = jnp.array([-0.8, -0.1, 0.0, 0.3, 1.2])
  w = jnp.array([0.5, -1.0, 2.0, 0.7, -0.3])
  s_max = 400.0
  for s in (1.0 / s_max, 0.5, 3.0):
    got = jax.grad(lambda e: jnp.sum(w * cl_optax.hat_gate(e, s, s_max)))(e)
    raw = jax.grad(lambda e: jnp.sum(w * jax.nn.sigmoid(s * e)))(e)
    en, sn = np.asarray(e, np.float64), float(s)
    factor = s_max / sn * (np.cosh(np.clip(sn * en, -50, 50)) + 1) / (np.cosh(en) + 1)
    np.testing.assert_allclose(got, np.asarray(raw) * factor, rtol=2e-4)
  np.testing.assert_allclose(cl_optax.hat_gate(e, 3.0), jax.nn.sigmoid(3.0 * e))


def test_hat_anneal_and_regularizer_against_the_formulas():
  s_max, n = 400.0, 1000
  for i in (0, 64, 936):
    want = (s_max - 1 / s_max) * i / n + 1 / s_max
    np.testing.assert_allclose(cl_optax.hat_anneal(i, n, s_max), want, rtol=1e-6)
  rng = np.random.default_rng(1)
  a = [rng.uniform(size=4), rng.uniform(size=3)]
  A = [rng.uniform(size=4), rng.uniform(size=3)]
  want = sum((x * (1 - y)).sum() for x, y in zip(a, A)) / sum((1 - y).sum() for y in A)
  np.testing.assert_allclose(cl_optax.losses.hat_regularizer(a, A), 0.75 * want, rtol=1e-6)
  first = cl_optax.losses.hat_regularizer(a, strength=1.0)
  np.testing.assert_allclose(first, np.concatenate(a).mean(), rtol=1e-6)
  full = cl_optax.losses.hat_regularizer(a, [np.ones(4), np.ones(3)])
  assert float(full) == 0.0


def test_hat_old_embedding_rows_and_heads_do_not_drift_under_adam_and_are_clamped():
  params = _mlp()
  params["emb"]["l1"] = params["emb"]["l1"].at[1, 0].set(5.9)
  hat = cl_optax.hat(["l1", "l2"], embeddings=["emb/l1", "emb/l2"], heads="head")
  tx = optax.chain(optax.adam(0.5), hat)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for i in range(3):  # task 0: momentum builds up on every row
    u, state = step(jax.tree.map(lambda x: jnp.full_like(x, -1.0 - i), params), state, params)
    params = optax.apply_updates(params, u)
  gates = [np.ones(4, np.float32), np.zeros(3, np.float32)]
  state = cl_optax.consolidate(state, params, gates=gates)
  g = jax.tree.map(lambda x: -jnp.ones_like(x), params)  # pushes embedding row 1 up
  u, state = step(g, state, params)
  for leaf in (u["emb"]["l1"], u["emb"]["l2"], u["head"]):
    np.testing.assert_array_equal(leaf[0], 0.0)  # task 0's rows: exactly still
  assert np.all(np.abs(u["head"][1]) > 0)
  new = optax.apply_updates(params, u)
  assert float(new["emb"]["l1"][1, 0]) == pytest.approx(6.0)
  np.testing.assert_array_equal(u["l1"]["kernel"], 0.0)  # A_l1 = 1: the layer is frozen
  # l2's inputs are all used but its units free: 1 - min(1, 0) = 1, it moves
  assert np.all(np.abs(u["l2"]["kernel"]) > 0) and np.all(np.abs(u["l2"]["bias"]) > 0)


# --------------------------------------------------------------- PackNet
def _np_prune(w, owner, task, p):
  cur = owner == task
  mags = np.sort(np.abs(w[cur]))
  k = int(np.round(p * cur.sum()))
  if k == 0:
    return np.zeros_like(cur)
  return cur & (np.abs(w) <= mags[k - 1])


def test_packnet_prune_with_ties_writes_exact_zeros_and_matches_numpy():
  w = np.array([[0.5, -0.2, 0.2, 1.0], [0.2, -3.0, 0.7, 0.1]], np.float32)
  params = {"l": {"kernel": jnp.asarray(w), "bias": jnp.ones(4)}, "head": {"kernel": jnp.ones(2)}}
  tx = optax.chain(optax.adam(0.1), cl_optax.packnet(heads="head"))
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, prune=0.25)  # k = 2: 0.1 and 0.2, and its ties
  want = _np_prune(w, np.ones_like(w, int), 1, 0.25)
  assert want.sum() == 4  # three tied at 0.2
  pn = state[1]
  np.testing.assert_array_equal(np.asarray(pn.packnet_owner["l"]["kernel"]) == 0, want)
  u, state = jax.jit(tx.update)(_ones(params), state, params)
  new = optax.apply_updates(params, u)
  k = np.asarray(new["l"]["kernel"])
  assert np.all(k[want] == 0.0) and not np.any(np.signbit(k[want]) & (k[want] != 0))
  np.testing.assert_array_equal(k[~want] != w[~want], True)  # the kept ones train
  state = cl_optax.consolidate(state, new, finish=True)  # task 2 takes the freed entries
  owner = np.asarray(state[1].packnet_owner["l"]["kernel"])
  np.testing.assert_array_equal(owner, np.where(want, 2, 1))
  params = new
  update = jax.jit(tx.update)
  for i in range(3):  # Adam's moments hold task-1 momentum: still no movement there
    u, state = update(jax.tree.map(lambda x: x * 0 + i, params), state, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_array_equal(np.asarray(params["l"]["kernel"])[~want], k[~want])
  np.testing.assert_array_equal(params["l"]["bias"], new["l"]["bias"])  # frozen after task 1
  assert not np.allclose(params["head"]["kernel"], new["head"]["kernel"])  # heads free
  t1 = cl_optax.packnet_params(params, state, 1)["l"]["kernel"]
  np.testing.assert_array_equal(t1, np.where(want, 0.0, k))
  t2 = cl_optax.packnet_params(params, state, 2)["l"]["kernel"]
  np.testing.assert_array_equal(t2, params["l"]["kernel"])


def test_packnet_prune_rule_random_against_numpy_and_share():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  w[0, :3] = 0.4  # ties
  owner = rng.integers(0, 3, size=w.shape).astype(np.int8)
  params = {"k": {"kernel": jnp.asarray(w)}}
  state = cl_optax.packnet().init(params)
  state = state._replace(
    packnet_owner={"k": {"kernel": jnp.asarray(owner)}}, packnet_task=jnp.asarray(2, jnp.int32)
  )
  for p in (0.0, 0.3, 0.5, 1.0):
    got = cl_optax.consolidate(state, params, prune=p).packnet_owner["k"]["kernel"]
    want = np.where(_np_prune(w, owner, 2, p), 0, owner)
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(
    [cl_optax.packnet_share(t, 10) for t in range(10)], [1 - 1 / (10 - t) for t in range(10)]
  )


# ------------------------------------------------------------------- WSN
def test_wsn_mask_size_ties_and_straight_through_gradient():
  rng = np.random.default_rng(4)
  for n, keep in ((37, 0.3), (8, 1.0), (8, 0.0)):
    s = rng.normal(size=n).astype(np.float32)
    k = 1 + round((1 - keep) * (n - 1))
    assert cl_optax.wsn_kth(n, keep) == k
    m = np.asarray(cl_optax.wsn_mask(jnp.asarray(s), keep))
    assert m.sum() == n - k + 1
    np.testing.assert_array_equal(m, np.abs(s) >= np.sort(np.abs(s))[k - 1])
  tied = jnp.array([0.1, 0.5, -0.5, 0.2])
  assert float(cl_optax.wsn_mask(tied, 0.25).sum()) == 2  # k = 3 (0.5), its tie kept
  w = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  s = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(2, 3)).astype(np.float32))

  def loss(w, s):
    return jnp.sum(jnp.tanh(x @ (cl_optax.wsn_mask(s, 0.5) * w)))

  gw, gs = jax.grad(loss, argnums=(0, 1))(w, s)
  m = cl_optax.wsn_mask(s, 0.5)
  g_eff = jax.grad(lambda v: jnp.sum(jnp.tanh(x @ v)))(m * w)
  np.testing.assert_allclose(gw, m * g_eff, rtol=1e-6)
  np.testing.assert_allclose(gs, np.sign(s) * w * g_eff, rtol=1e-6)


def test_wsn_mask_bisection_cutoff_matches_a_sort():
  """The k-th magnitude found by bisection over the float32 bits equals the sorted one:
  ties, zeros (both signs), tiny, huge and infinite scores; float16 takes the sort."""
  rng = np.random.default_rng(7)
  s = rng.normal(size=(50, 40)).astype(np.float32)
  s[:5] = np.round(s[:5], 1)  # many ties
  s[5, :8] = [0.0, -0.0, 1e-38, -1e-45, 3e38, -np.inf, np.inf, 2.0]
  for keep in (0.0, 0.1, 0.5, 0.77, 1.0):
    k = cl_optax.wsn_kth(s.size, keep)
    want = np.abs(s) >= np.sort(np.abs(s).ravel())[k - 1]
    np.testing.assert_array_equal(np.asarray(cl_optax.wsn_mask(jnp.asarray(s), keep)), want)
  half = jnp.asarray(s[:4], jnp.float16)
  k = cl_optax.wsn_kth(half.size, 0.5)
  want = np.abs(np.asarray(half)) >= np.sort(np.abs(np.asarray(half)).ravel())[k - 1]
  np.testing.assert_array_equal(np.asarray(cl_optax.wsn_mask(half, 0.5)) > 0, want)


def test_wsn_masks_store_roundtrip_and_freeze_merges_by_or():
  like = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((9,))}
  store = cl_optax.WSNMasks.create(like, max_tasks=3)
  rng = np.random.default_rng(5)
  masks = [jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape) < 0.4), like)]
  masks.append(jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape) < 0.4), like))
  store = jax.jit(lambda st, m: st.store(1, m))(store, masks[1])
  store = store.store(0, masks[0])
  assert store.wsn_bits["a"].dtype == jnp.uint8 and store.wsn_bits["a"].shape == (3, 2)
  for t in (0, 1):
    jax.tree.map(np.testing.assert_array_equal, store.mask(t), masks[t])
  np.testing.assert_allclose(store.used(0)["b"], np.mean(masks[0]["b"]))
  assert not np.any(store.mask(2)["a"])
  tx = optax.chain(optax.adam(0.1), cl_optax.freeze())
  state = tx.init(like)
  for m in masks:
    state = cl_optax.consolidate(state, like, importance=jax.tree.map(jnp.float32, m))
  u, _ = jax.jit(tx.update)(_ones(like), state, like)
  either = jax.tree.map(jnp.logical_or, *masks)
  jax.tree.map(lambda uu, e: np.testing.assert_array_equal(np.asarray(uu)[e], 0.0), u, either)
