"""Boundary-free streams (online permuted MNIST, slowly-changing regression), metrics vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cl_optax import metrics, streams


def _scan(stream, n, batch):
  def body(c, _):
    c, *out = stream.next(c, batch)
    return c, (*out, c)

  return jax.jit(lambda: jax.lax.scan(body, stream.init(), None, length=n))()


def test_online_permuted_composes_permutations_and_serves_each_example_once():
  rng = np.random.default_rng(0)
  x = rng.random((6, 5), dtype=np.float32)
  y = np.arange(6)
  s = streams.online_permuted(x, y, examples_per_task=6, seed=3)
  _, (xs, ys, task, cursors) = _scan(s, 9, 2)  # 3 tasks of 3 batches of 2
  xs, ys, task = np.asarray(xs), np.asarray(ys), np.asarray(task)
  np.testing.assert_array_equal(task, np.repeat([0, 1, 2], 3))
  perm = np.arange(5)
  for t in range(3):
    kp, ko = s.task_keys(jnp.int32(t))
    p = np.asarray(jax.random.permutation(kp, 5))
    perm = perm[p]  # P_t = P_{t-1}[p_t]: the official code permutes permuted images
    got_y = ys[3 * t : 3 * t + 3].reshape(-1)
    assert sorted(got_y.tolist()) == list(range(6))  # each example once per task
    np.testing.assert_array_equal(xs[3 * t : 3 * t + 3].reshape(6, 5), x[got_y][:, perm])
  assert np.asarray(cursors.perm_pixels).shape == (9, 5)  # one [d] permutation held


@pytest.mark.slow
def test_slowly_changing_regression_matches_numpy_target_and_bit_schedule():
  for flip_one in (False, True):
    s = streams.slowly_changing_regression(flip_after=4, flip_one=flip_one, seed=1)
    _, (xs, ys, _) = _scan(s, 16, 2)
    x = np.asarray(xs).reshape(32, 20)
    w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (s.w1, s.b1, s.w2, s.b2))
    S = (20 - w1.sum(0) + b1) / 2  # lop/nets/fix_ltu_net.py
    h = (x @ w1 + b1 > 0.7 * 21 - S).astype(np.float64)
    np.testing.assert_allclose(np.asarray(ys).reshape(-1), h @ w2 + b2, atol=1e-5)
    slow = x[:, :15].reshape(8, 4, 15)
    assert (slow == slow[:, :1]).all()  # held for flip_after examples
    changes = np.abs(np.diff(slow[:, 0], axis=0)).sum(1)
    if flip_one:
      np.testing.assert_array_equal(changes, 1)
    else:
      assert changes.max() > 1
    assert set(np.unique(x).tolist()) <= {0.0, 1.0}


def test_stream_argument_errors():
  with pytest.raises(ValueError, match="online_permuted"):
    streams.online_permuted(np.zeros((3, 2)), np.zeros(4), examples_per_task=3)
  with pytest.raises(ValueError, match="n_slow"):
    streams.slowly_changing_regression(n_slow=20)


def _erank_np(a):
  s = np.linalg.svd(a, compute_uv=False)
  p = s / s.sum()
  p = p[p > 0]
  return np.exp(-(p * np.log(p)).sum())


def test_plasticity_metrics_match_numpy():
  rng = np.random.default_rng(0)
  h = np.maximum(rng.normal(size=(7, 5)), 0).astype(np.float32)
  h[:, 2] = 0.0
  h[:, 4] = 0.0
  np.testing.assert_allclose(metrics.dead_fraction(jnp.asarray(h)), 0.4)
  np.testing.assert_allclose(metrics.effective_rank(jnp.asarray(h)), _erank_np(h), rtol=1e-5)
  assert float(metrics.effective_rank(jnp.zeros((3, 2)))) == 0.0
  tree = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
  ref = np.concatenate([np.abs(v).ravel() for v in tree.values()]).mean()
  np.testing.assert_allclose(metrics.mean_weight_magnitude(tree), ref, rtol=1e-6)
  c = rng.random(11) > 0.5
  np.testing.assert_allclose(metrics.online_accuracy(c, 5), c[:10].reshape(2, 5).mean(1))
