"""X-DER's SupCon consistency and 1/u rewrite rule against numpy loops as mammoth has them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_optax
from benchmarks.continual.methods import xder
from benchmarks.continual.registry import AuxInit, Step
from cl_optax import losses

RNG = np.random.default_rng(1)
F = RNG.normal(size=(5, 2, 4)).astype(np.float32)  # 5 items, 2 views, 4 features
L = np.array([0, 1, 0, 2, 1])
_cons = jax.jit(losses.xder_consistency, static_argnames=("head_size", "temperature"))
_select = jax.jit(losses.xder_rewrite_select)


def _supcon_np(feats, labels, temp, base, reduction):
  """SupContrast's ``SupConLoss`` (contrast_mode 'all'), line by line in float64."""
  n, v, _ = feats.shape
  contrast = np.concatenate([feats[:, k] for k in range(v)], 0).astype(np.float64)
  adc = contrast @ contrast.T / temp
  logits = adc - adc.max(1, keepdims=True)
  mask = np.tile((labels[:, None] == labels[None, :]).astype(np.float64), (v, v))
  logits_mask = 1.0 - np.eye(n * v)
  mask = mask * logits_mask
  log_prob = logits - np.log((np.exp(logits) * logits_mask).sum(1, keepdims=True))
  mean_pos = (mask * log_prob).sum(1) / mask.sum(1)
  loss = (-(temp / base) * mean_pos).reshape(v, n).mean(0)
  return loss.mean() if reduction == "mean" else loss.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_supcon_matches_supcontrast(reduction):
  got = losses.supcon_loss(F, jnp.asarray(L), temperature=0.5, base_temperature=0.7,
                           reduction=reduction)  # fmt: skip
  np.testing.assert_allclose(got, _supcon_np(F, L, 0.5, 0.7, reduction), rtol=1e-5)
  keep = np.array([True, True, False, True, True])  # a padding row leaves anchors and contrasts
  got = losses.supcon_loss(F, jnp.asarray(L), temperature=0.5, where=keep, reduction=reduction)
  np.testing.assert_allclose(got, _supcon_np(F[keep], L[keep], 0.5, 0.5, reduction), rtol=1e-5)


def test_xder_consistency_sums_future_heads_over_heads_and_items():
  z = RNG.normal(size=(4, 2, 6)).astype(np.float32)  # 3 heads of 2 classes
  y = np.array([0, 1, 1, 3])
  fut = np.array([False, False, True, True, True, True])  # task 0: heads 1 and 2 ahead
  got = _cons(z, jnp.asarray(y), fut, head_size=2, temperature=5.0)
  want = 0.0
  for h in (1, 2):
    zh = z[:, :, 2 * h : 2 * h + 2]
    zh = zh / np.linalg.norm(zh, axis=-1, keepdims=True)
    want += _supcon_np(zh, y, 5.0, 5.0, "sum")
  np.testing.assert_allclose(got, want / (2 * 4), rtol=1e-5)
  last = _cons(z, jnp.asarray(y), np.zeros(6, bool), head_size=2, temperature=5.0)
  assert float(last) == 0.0
  g = jax.jit(jax.grad(lambda a: _cons(a, jnp.asarray(y), fut, head_size=2, temperature=5.0)))(z)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, :, :2] == 0)  # past heads untouched


def _select_np(idx, eligible, counter, draw):
  """mammoth's ``observe``: de-duplicate (first wins), ``u += 1`` if chosen, ``rand*u < 1``."""
  counter = counter.copy()
  seen, out = set(), np.zeros(len(idx), bool)
  chosen = []
  for i, j in enumerate(idx):
    if j not in seen and eligible[i]:
      chosen.append(i)
    seen.add(j)
  for i in chosen:
    counter[idx[i]] += 1
  for i in chosen:
    out[i] = draw[i] * counter[idx[i]] < 1
  return out, counter


def test_xder_rewrite_select_is_the_one_over_u_rule():
  idx = np.array([3, 7, 3, 1, 7, 0, 5, 2])  # two memory batches, slots 3 and 7 drawn twice
  eligible = np.array([True, True, True, False, True, True, True, True])
  counter = np.array([0, 0, 3, 1, 0, 9, 0, 2], np.float32)
  key = jax.random.key(4)
  rewrite, new = _select(idx, eligible, counter, key)
  draw = np.asarray(jax.random.uniform(key, idx.shape))
  want, want_counter = _select_np(idx, eligible, counter, draw)
  np.testing.assert_array_equal(rewrite, want)
  np.testing.assert_array_equal(new, want_counter)
  assert not rewrite[2] and not rewrite[4]  # the repeats are never written twice
  assert new[1] == 0  # an ineligible slot (a current-task label) is not counted
  # a slot with count u is rewritten about 1/u of the time
  draws = jax.jit(jax.vmap(
    lambda k: _select(jnp.array([0]), jnp.array([True]), jnp.array([3.0]), k)[0]
  ))(jax.random.split(jax.random.key(0), 2000))  # fmt: skip
  assert abs(float(jnp.mean(draws)) - 0.25) < 0.03


@pytest.mark.slow
def test_xder_past_constraint_pushes_only_the_current_head_up():
  z = RNG.normal(size=(6, 6)).astype(np.float32) * 2
  past = np.array([True, True, False, False, False, False])
  cur = np.array([False, False, True, True, False, False])
  e = np.exp(np.where(past | cur, z, -np.inf) - z.max(1, keepdims=True))
  p = e / e.sum(1, keepdims=True)
  v = p[:, past].max(1) + 0.3 - p[:, cur].max(1)
  want = v[v > 0].mean() if (v > 0).any() else 0.0
  got = losses.xder_past_constraint(z, past, cur, margin=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(losses.xder_past_constraint(z, np.zeros(6, bool), cur)) == 0.0  # first task
  g = np.asarray(jax.jit(jax.grad(lambda a: losses.xder_past_constraint(a, past, cur)))(z))
  np.testing.assert_array_equal(g[:, 4:], 0.0)  # future heads take no part
  rows = v > 0  # the past maximum is a constant: the gradient is that of -max p_current

  def current_only(a):
    q = jax.nn.softmax(jnp.where(past | cur, a, -jnp.inf), axis=-1)
    return -jnp.sum(jnp.where(rows, jnp.max(jnp.where(cur, q, 0.0), axis=-1), 0.0)) / rows.sum()

  np.testing.assert_allclose(g, np.asarray(jax.grad(current_only)(jnp.asarray(z))), atol=1e-6)


@pytest.mark.slow  # compiles the runner's step
def test_runner_step_rewrites_only_past_items_on_current_and_future_heads():
  aux = xder._init(AuxInit(2, (6,), {"buffer": 8}, 4, None))
  x = jnp.asarray(RNG.normal(size=(6, 6)), jnp.float32)
  y = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)  # classes 0, 1: task 0 (past); 2: current
  mem = cl_optax.replay.fill(aux["memory"], {"x": x, "y": y, "logits": jnp.ones((6, 4))}, y)
  w = jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)
  valid = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  cols = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]])

  def step(w, mem, u):
    s = Step({"w": w}, x[:2], jnp.array([2, 3]), jnp.int32(1), 2, {"memory": mem, "u": u},
             jax.random.key(0), None, {"memory_batch": 4, "gamma": 0.85},
             lambda p, v: v @ p["w"], cols, valid)  # fmt: skip
    return xder._step(s)[1]

  new = jax.jit(step)(w, mem, aux["u"])
  got = np.asarray(new["memory"].items["logits"])[:6]
  past = np.asarray(y) < 2
  u = np.asarray(new["u"])[:6]
  assert np.all(u[~past] == 0) and np.all(u[past] <= 1) and u.sum() > 0  # drawn past slots
  changed = np.any(got != 1.0, axis=1)
  assert np.all(changed == (u == 1))  # first draw: u = 1, rewritten with probability 1
  np.testing.assert_array_equal(got[:, :2], 1.0)  # the past heads are never rewritten
