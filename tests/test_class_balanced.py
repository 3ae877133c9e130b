"""Class-balanced memory: greedy / CBRS invariants, fill and shrink, herding, NME, balanced draw."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_optax import replay

ITEM = (jnp.zeros((2,), jnp.float32), jnp.zeros((), jnp.int32))


def _items(labels, start=0):
  y = jnp.asarray(labels, jnp.int32)
  ids = jnp.arange(start, start + y.shape[0], dtype=jnp.float32)
  return (jnp.stack([ids, y.astype(jnp.float32)], 1), y)


def _check_invariants(mem, cap):
  slot_class = np.asarray(mem.slot_class)
  full = slot_class >= 0
  counts = np.bincount(slot_class[full], minlength=mem.class_count.shape[0])
  np.testing.assert_array_equal(mem.class_count, counts)  # counts match the slots
  assert counts.sum() <= cap
  np.testing.assert_array_equal(np.asarray(mem.items[1])[full], slot_class[full])  # x, y together
  np.testing.assert_array_equal(np.asarray(mem.items[0])[full, 1], slot_class[full])
  np.testing.assert_array_equal(replay.filled(mem), full)
  assert len(set(np.asarray(mem.items[0])[full, 0].tolist())) == full.sum()  # no item twice


@functools.partial(jax.jit, static_argnames=("rule", "cap", "classes"))
def _stream(labels, key, rule, cap=12, classes=4):
  """Offers ``_items(labels)`` in batches of 6 (one compiled ``add_balanced``)."""
  n = labels.shape[0] // 6
  x, y = _items(labels)

  def step(mem, inputs):
    xb, yb, k = inputs
    return replay.add_balanced(mem, (xb, yb), yb, key=k, rule=rule), None

  xs = (x.reshape(n, 6, 2), y.reshape(n, 6), jax.random.split(key, n))
  return jax.lax.scan(step, replay.init_balanced(ITEM, cap, classes), xs)[0]


# class 0 floods the stream, then 1 and 2 alternate, then 3 gives only 2 items
LABELS = jnp.asarray([0] * 24 + [1, 2] * 9 + [3, 3, 1, 2, 1, 2], jnp.int32)


def test_greedy_balances_classes_and_is_deterministic_under_a_key():
  mem = _stream(LABELS, jax.random.key(0), "greedy")
  _check_invariants(mem, 12)
  counts = np.asarray(mem.class_count)
  assert counts.sum() == 12 and counts[3] == 2  # class 3 is under its K/|Y| quota: keeps all
  assert counts[:3].max() - counts[:3].min() <= 1, counts  # the others share the rest
  np.testing.assert_array_equal(mem.class_stream, np.bincount(LABELS, minlength=4))
  again = _stream(LABELS, jax.random.key(0), "greedy")
  np.testing.assert_array_equal(mem.items[0], again.items[0])  # the same key, the same memory
  other = _stream(LABELS, jax.random.key(5), "greedy")
  assert not np.array_equal(mem.slot_class, other.slot_class) or not np.array_equal(
    mem.items[0], other.items[0]
  )  # the key decides the evictions


def test_cbrs_keeps_minority_classes_and_marks_full():
  mem = _stream(LABELS, jax.random.key(1), "cbrs")
  _check_invariants(mem, 12)
  counts = np.asarray(mem.class_count)
  assert counts[3] == 2 and counts.sum() == 12  # the rarest class keeps every item
  assert counts.max() - counts[:3].min() <= 1, counts
  assert bool(mem.class_full[0]) and not bool(mem.class_full[3])


def test_cbrs_within_a_full_class_is_reservoir_uniform():
  """One class only: CBRS is reservoir sampling (each of N items kept with p = K/N)."""
  n, cap, trials = 24, 6, 400

  run = lambda key: _stream(jnp.zeros(n, jnp.int32), key, "cbrs", cap, 2).items[0][:, 0]  # noqa: E731
  keys = jax.random.split(jax.random.key(2), trials)
  stored = np.asarray(jax.jit(jax.vmap(run))(keys)).astype(int)
  freq = np.bincount(stored.ravel(), minlength=n) / trials
  np.testing.assert_allclose(freq, cap / n, atol=0.08)


@pytest.mark.slow
def test_fill_and_shrink_keep_rank_order():
  mem = replay.init_balanced(ITEM, 8, 3)
  mem = replay.fill(mem, _items([0] * 5), jnp.zeros(5, jnp.int32))  # in herding order
  mem = replay.fill(mem, _items([1] * 5, 5), jnp.ones(5, jnp.int32))  # 3 fit, 2 dropped
  _check_invariants(mem, 8)
  np.testing.assert_array_equal(mem.class_count, [5, 3, 0])
  mem = replay.shrink(mem, 2)
  _check_invariants(mem, 8)
  kept = np.asarray(mem.items[0])[np.asarray(replay.filled(mem)), 0]
  np.testing.assert_array_equal(np.sort(kept), [0, 1, 5, 6])  # the first two of each class
  mem = replay.fill(mem, _items([2] * 4, 10), jnp.full(4, 2, jnp.int32), where=jnp.arange(4) != 1)
  _check_invariants(mem, 8)
  np.testing.assert_array_equal(mem.class_count, [2, 2, 3])
  mem = replay.shrink(mem, jnp.array([1, 2, 1]))
  kept = np.asarray(mem.items[0])[np.asarray(replay.filled(mem)), 0]
  np.testing.assert_array_equal(np.sort(kept), [0, 5, 6, 10])


def _herding_loop(phi, num):
  mu, picked, running = phi.mean(0), [], np.zeros(phi.shape[1])
  for k in range(1, num + 1):
    dist = [
      np.inf if i in picked else np.linalg.norm(mu - (running + p) / k) for i, p in enumerate(phi)
    ]
    picked.append(int(np.argmin(dist)))
    running = running + phi[picked[-1]]
  return picked


def test_herding_matches_a_loop_and_class_means_nme_match_loops():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(9, 4)).astype(np.float32)
  idx, ok = replay.herding_select(jnp.asarray(feats), 6)
  phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  assert idx.tolist() == _herding_loop(phi.astype(np.float64), 6) and bool(ok.all())
  idx, ok = replay.herding_select(jnp.asarray(feats), 4, where=jnp.arange(9) < 3, normalize=False)
  assert sorted(idx[:3].tolist()) == [0, 1, 2] and ok.tolist() == [True] * 3 + [False]
  labels = np.array([0, 0, 2, 2, 2, 0, 3, 3, 0])
  means, present = replay.class_means(jnp.asarray(feats), jnp.asarray(labels), 5)
  for c in range(5):
    if (labels == c).any():
      m = phi[labels == c].mean(0)
      np.testing.assert_allclose(means[c], m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
  assert present.tolist() == [True, False, True, True, False]
  x = rng.normal(size=(7, 4)).astype(np.float32)
  pred = replay.nme_predict(jnp.asarray(x), means, class_mask=present)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  want = [
    min((c for c in (0, 2, 3)), key=lambda c: np.sum((v - np.asarray(means[c])) ** 2)) for v in xn
  ]
  assert pred.tolist() == want


@pytest.mark.slow
def test_balanced_sampling_equalises_classes_and_write_roundtrips():
  mem = replay.init_balanced(ITEM, 10, 2)
  mem = replay.fill(mem, _items([0] * 8 + [1] * 2), jnp.asarray([0] * 8 + [1] * 2, jnp.int32))
  keys = jax.random.split(jax.random.key(3), 500)
  draw = jax.jit(jax.vmap(lambda k: replay.sample_indices(mem, k, 1, balanced=True)[0][0]))
  first = np.asarray(mem.slot_class)[np.asarray(draw(keys))]
  assert abs(first.mean() - 0.5) < 0.08, first.mean()  # uniform draws would give 0.2
  idx, valid = replay.sample_indices(mem, jax.random.key(4), 4)
  x, y = replay.take(mem, idx)
  mem2 = replay.write(mem, idx, (x + 100.0, y), where=jnp.array([True, True, False, True]))
  changed = np.asarray(mem2.items[0][:, 0] != mem.items[0][:, 0])
  assert changed.sum() == 3 and set(np.flatnonzero(changed)) <= set(idx.tolist())
  np.testing.assert_array_equal(mem2.slot_class, mem.slot_class)
  assert bool(valid.all())
