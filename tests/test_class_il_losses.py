"""losses.seen_classes_mask and losses.masked_cross_entropy against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cl_optax import losses


def _np_mask(classes, num_classes, where=None):
  m = np.zeros(num_classes, bool)
  classes = np.asarray(classes).ravel()
  keep = np.ones(classes.shape, bool) if where is None else np.asarray(where).ravel()
  for c, k in zip(classes, keep):
    if k:
      m[c] = True
  return m


def _np_masked_ce(logits, labels, mask, weights=None):
  """Explicit loops: -z_y + log sum over the active classes of e^z (float64)."""
  logits = np.asarray(logits, np.float64)
  mask = np.broadcast_to(mask, logits.shape)
  per = np.zeros(labels.shape)
  for i in np.ndindex(labels.shape):
    if not mask[i].any():
      continue
    z = logits[i][mask[i]]
    per[i] = -logits[i][labels[i]] + np.log(np.sum(np.exp(z - z.max()))) + z.max()
  w = np.ones(labels.shape) if weights is None else np.broadcast_to(weights, labels.shape)
  return 0.0 if w.sum() == 0 else float(np.sum(w * per) / w.sum())


_N_IDS, _N_CLASSES = 9, 6  # one shape: hypothesis draws the ids and `where`, not the sizes
_jit_seen = jax.jit(losses.seen_classes_mask, static_argnums=1)


@settings(deadline=None, max_examples=30)
@given(st.data())
def test_seen_classes_mask_matches_numpy(data):
  ids = st.lists(st.integers(0, _N_CLASSES - 1), min_size=_N_IDS, max_size=_N_IDS)
  classes = np.asarray(data.draw(ids), np.int32)
  where = np.asarray(data.draw(st.lists(st.booleans(), min_size=_N_IDS, max_size=_N_IDS)), bool)
  np.testing.assert_array_equal(
    losses.seen_classes_mask(classes, _N_CLASSES), _np_mask(classes, _N_CLASSES)
  )
  np.testing.assert_array_equal(
    losses.seen_classes_mask(classes, _N_CLASSES, where=where),
    _np_mask(classes, _N_CLASSES, where),
  )
  np.testing.assert_array_equal(_jit_seen(classes, _N_CLASSES), _np_mask(classes, _N_CLASSES))


def test_seen_classes_mask_takes_any_shape_and_accumulates():
  seen = losses.seen_classes_mask(jnp.array([[0, 1], [1, 0]]), 5)
  seen = seen | losses.seen_classes_mask(jnp.array([4]), 5)
  assert seen.dtype == jnp.bool_ and seen.tolist() == [True, True, False, False, True]
  assert not losses.seen_classes_mask(jnp.zeros((0,), jnp.int32), 3).any()


def test_seen_classes_mask_errors():
  with pytest.raises(ValueError, match=r"class ids \[-1, 5\] are outside \[0, 5\)"):
    losses.seen_classes_mask(jnp.array([0, 5, -1]), 5)
  # an id excluded by `where` is not checked (e.g. an unfilled replay slot)
  assert losses.seen_classes_mask(jnp.array([0, 7]), 5, where=jnp.array([True, False])).sum() == 1
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    losses.seen_classes_mask(jnp.array([0]), 0)
  with pytest.raises(ValueError, match="must be integer ids"):
    losses.seen_classes_mask(jnp.array([0.0]), 3)
  with pytest.raises(ValueError, match=r"`where` of shape \(3,\) does not broadcast"):
    losses.seen_classes_mask(jnp.array([0, 1]), 3, where=jnp.ones(3, bool))
  # under jit an out-of-range id matches no class
  out = jax.jit(losses.seen_classes_mask, static_argnums=1)(jnp.array([1, 9, -1]), 4)
  assert out.tolist() == [False, True, False, False]


_B, _C = 5, 7  # one shape: hypothesis draws values, not shapes (one compile per weights kind)
_jit_masked_ce = jax.jit(losses.masked_cross_entropy)
_grad_masked_ce = jax.jit(jax.grad(losses.masked_cross_entropy))


@pytest.mark.slow
@settings(deadline=None, max_examples=30)
@given(st.data())
def test_masked_cross_entropy_matches_numpy(data):
  seed = data.draw(st.integers(0, 2**30))
  scale = data.draw(st.floats(0.1, 50.0))
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(_B, _C))).astype(np.float32)
  mask = rng.random(_C) < 0.6
  mask[rng.integers(_C)] = True
  labels = rng.choice(np.flatnonzero(mask), size=_B).astype(np.int32)
  weights = data.draw(st.sampled_from([None, "bool", "float"]))
  if weights == "bool":
    weights = rng.random(_B) < 0.5
  elif weights == "float":
    weights = rng.random(_B).astype(np.float32)
  want = _np_masked_ce(logits, labels, mask, weights)
  got = losses.masked_cross_entropy(logits, labels, mask, weights=weights)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(
    _jit_masked_ce(logits, labels, mask, weights=weights), want, rtol=2e-5, atol=2e-5
  )
  # the gradient is finite, zero on the masked classes, and softmax - onehot on the others
  grad = _grad_masked_ce(logits, labels, mask, weights=weights)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[:, ~mask], 0.0)


def test_masked_cross_entropy_with_all_classes_is_optax_cross_entropy():
  import optax

  z = jax.random.normal(jax.random.key(0), (4, 3, 5))
  y = jax.random.randint(jax.random.key(1), (4, 3), 0, 5)
  want = optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  np.testing.assert_allclose(losses.masked_cross_entropy(z, y, jnp.ones(5, bool)), want, rtol=1e-6)


@pytest.mark.slow
def test_masked_cross_entropy_per_example_masks_empty_rows_and_no_nan():
  z = jnp.array([[1.0, 2.0, 3.0], [0.0, -500.0, 800.0], [5.0, 5.0, 5.0]])
  y = jnp.array([0, 1, 2])
  mask = jnp.array([[True, True, False], [False, True, False], [False, False, False]])
  got = losses.masked_cross_entropy(z, y, mask)
  want = (np.log1p(np.exp(1.0)) + 0.0 + 0.0) / 3  # row 1: one active class; row 2: none
  np.testing.assert_allclose(got, want, rtol=1e-6)
  g = jax.grad(lambda z: losses.masked_cross_entropy(z, y, mask))(z)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g[1:]).max()) == 0.0
  # bfloat16 logits are computed in float32
  out = losses.masked_cross_entropy(z[:1].astype(jnp.bfloat16), y[:1], mask[0])
  assert out.dtype == jnp.float32
  # no weight set: 0
  assert float(losses.masked_cross_entropy(z, y, mask, weights=jnp.zeros(3))) == 0.0


def test_masked_cross_entropy_errors():
  z, y, m = jnp.zeros((2, 4)), jnp.array([0, 1]), jnp.array([True, True, False, False])
  with pytest.raises(ValueError, match=r"`labels` must have the shape \(2,\)"):
    losses.masked_cross_entropy(z, y[:1], m)
  with pytest.raises(ValueError, match="`labels` must be integers"):
    losses.masked_cross_entropy(z, y.astype(jnp.float32), m)
  with pytest.raises(ValueError, match=r"`class_mask` must be a bool mask broadcastable"):
    losses.masked_cross_entropy(z, y, m[:3])
  with pytest.raises(ValueError, match=r"`class_mask` must be a bool mask"):
    losses.masked_cross_entropy(z, y, m.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"`weights` of shape \(3,\) does not broadcast"):
    losses.masked_cross_entropy(z, y, m, weights=jnp.ones(3))
  with pytest.raises(ValueError, match=r"labels \[2\] are masked out by `class_mask`"):
    losses.masked_cross_entropy(z, jnp.array([0, 2]), m)
  with pytest.raises(ValueError, match=r"labels \[4\] are outside \[0, 4\)"):
    losses.masked_cross_entropy(z, jnp.array([4, 0]), m)
  # an example of weight 0 is not checked (an unfilled replay row)
  out = losses.masked_cross_entropy(z, jnp.array([0, 3]), m, weights=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)
