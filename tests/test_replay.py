"""The episodic memory: reservoir uniformity, ring order, sampling, jit, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cl_optax import replay

ITEM = (jnp.zeros((2,), jnp.float32), jnp.zeros((), jnp.int32))


def _batch(start, b):
  ids = jnp.arange(start, start + b, dtype=jnp.int32)
  return (jnp.stack([ids, -ids], 1).astype(jnp.float32), ids)


@pytest.mark.slow
def test_reservoir_is_uniform_chi_square():
  """Every one of N offered items ends up stored with probability C / N."""
  n_items, cap, b, trials = 60, 10, 4, 3000

  def run(key):
    mem = replay.init(ITEM, cap)
    for i, k in enumerate(jax.random.split(key, n_items // b)):
      mem = replay.add(mem, _batch(i * b, b), key=k)
    return mem.items[1]

  stored = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), trials)))
  assert all(len(set(row)) == cap for row in stored)  # no item stored twice
  counts = np.bincount(stored.ravel(), minlength=n_items)
  expected = np.full(n_items, trials * cap / n_items)
  _, p = stats.chisquare(counts, expected)
  assert p > 1e-3, (p, counts)


@pytest.mark.slow
def test_reservoir_fills_in_order_then_counts_seen():
  mem = replay.init(ITEM, 5)
  mem = replay.add(mem, _batch(0, 3), key=jax.random.key(0))
  np.testing.assert_array_equal(mem.items[1], [0, 1, 2, 0, 0])
  np.testing.assert_array_equal(replay.filled(mem), [True, True, True, False, False])
  mem = replay.add(mem, _batch(3, 4), key=jax.random.key(1))
  assert int(mem.seen) == 7 and bool(replay.filled(mem).all())
  assert set(np.asarray(mem.items[1])) <= set(range(7))
  np.testing.assert_array_equal(mem.items[0][:, 0], mem.items[1])  # x and y stay together


@pytest.mark.slow
class ReplayJitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_add_and_sample_same_with_and_without_jit(self):
    add = self.variant(lambda m, b, k: replay.add(m, b, key=k))
    mem = replay.init(ITEM, 6)
    for i in range(4):
      mem = add(mem, _batch(3 * i, 3), jax.random.key(i))
    ref = replay.init(ITEM, 6)
    with jax.disable_jit():  # the reference: every op and branch run in Python
      for i in range(4):
        ref = replay.add(ref, _batch(3 * i, 3), key=jax.random.key(i))
      want = replay.sample(ref, jax.random.key(9), 4)
    chex.assert_trees_all_equal(mem, ref)
    sample = self.variant(lambda m, k: replay.sample(m, k, 4))
    chex.assert_trees_all_equal(sample(mem, jax.random.key(9)), want)


@pytest.mark.slow
def test_sample_is_distinct_valid_and_uniform():
  mem = replay.init(ITEM, 8)
  mem = replay.add(mem, _batch(0, 5), key=jax.random.key(0))  # 5 of 8 slots filled
  (x, y), valid = replay.sample(mem, jax.random.key(1), 7)
  np.testing.assert_array_equal(valid, [True] * 5 + [False] * 2)
  assert sorted(np.asarray(y[:5])) == [0, 1, 2, 3, 4]
  draws = jax.vmap(lambda k: replay.sample(mem, k, 2)[0][1])(
    jax.random.split(jax.random.key(2), 2000)
  )
  counts = np.bincount(np.asarray(draws).ravel(), minlength=5)
  _, p = stats.chisquare(counts)
  assert p > 1e-3 and np.all(np.asarray(draws[:, 0]) != np.asarray(draws[:, 1]))


def test_empty_memory_samples_nothing_valid():
  mem = replay.init(ITEM, 4)
  _, valid = replay.sample(mem, jax.random.key(0), 3)
  assert not bool(valid.any())


def test_task_ring_keeps_most_recent_per_task_and_samples_selected_tasks():
  mem = replay.init(ITEM, 4, num_tasks=3)
  add = jax.jit(lambda m, b, t: replay.add(m, b, task=t))
  mem = add(mem, _batch(0, 3), 0)
  mem = add(mem, _batch(3, 3), 0)  # wraps: slots hold 4, 5, 2, 3
  mem = add(mem, _batch(100, 6), 2)  # more than the capacity at once: the last 4 stay
  np.testing.assert_array_equal(mem.items[1][0], [4, 5, 2, 3])
  assert sorted(np.asarray(mem.items[1][2])) == [102, 103, 104, 105]
  np.testing.assert_array_equal(mem.written, [6, 0, 6])
  np.testing.assert_array_equal(replay.filled(mem).sum(1), [4, 0, 4])
  (_, y), valid = replay.sample(mem, jax.random.key(0), 6, tasks=jnp.array([True, True, False]))
  assert bool(valid[:4].all()) and not bool(valid[4:].any())
  assert set(np.asarray(y[:4])) == {2, 3, 4, 5}


def test_bad_inputs():
  with pytest.raises(ValueError, match="capacity must be a positive integer; got 0"):
    replay.init(ITEM, 0)
  res, ring = replay.init(ITEM, 4), replay.init(ITEM, 4, num_tasks=2)
  with pytest.raises(ValueError, match="a Reservoir needs `key=`"):
    replay.add(res, _batch(0, 2))
  with pytest.raises(ValueError, match="a TaskRing needs `task=`"):
    replay.add(ring, _batch(0, 2))
  with pytest.raises(ValueError, match=r"task 2 is outside \[0, 2\)"):
    replay.add(ring, _batch(0, 2), task=2)
  with pytest.raises(
    ValueError, match=r"a batch leaf has shape \(2, 3\); expected \(batch, \*\(2,\)\)"
  ):
    replay.add(res, (jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="the batch must have the items' structure"):
    replay.add(res, jnp.zeros((2, 2)), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"`tasks` has shape \(3,\); expected \(2,\)"):
    replay.sample(ring, jax.random.key(0), 2, tasks=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="batch_size 5 exceeds the 4 slots"):
    replay.sample(res, jax.random.key(0), 5)
