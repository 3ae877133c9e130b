"""ER (a transform; the shared battery runs it in test_common.py), DER's and LwF's loss
terms: numpy references and edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cl_optax import experience_replay
from cl_optax.losses import der_logit_mse, lwf_distillation

from conftest import make_params, normal_like


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------ experience_replay


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 3.0])
def test_er_matches_reference(weight):
  params = make_params()
  g, r = normal_like(params, 1), normal_like(params, 2)
  tx = experience_replay(weight)
  got, state = tx.update(g, tx.init(params), params, replay_grads=r)
  np.testing.assert_allclose(_flat(got), _flat(g) + weight * _flat(r), rtol=1e-6, atol=1e-6)
  assert int(state.replay_steps) == 1


@pytest.mark.slow
def test_er_is_the_gradient_of_the_summed_losses():
  """chain(experience_replay(w), sgd) steps along grad(l(B) + w l(B_M)), DER++'s beta term."""
  key = jax.random.split(jax.random.key(0), 4)
  w = {"kernel": jax.random.normal(key[0], (3, 2))}
  xb, xm = jax.random.normal(key[1], (5, 3)), jax.random.normal(key[2], (4, 3))
  yb, ym = jnp.array([0, 1, 0, 1, 1]), jnp.array([1, 0, 0, 1])

  def ce(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"], y).mean()

  tx = optax.chain(experience_replay(0.7), optax.sgd(0.1))
  updates, _ = tx.update(
    jax.grad(ce)(w, xb, yb), tx.init(w), w, replay_grads=jax.grad(ce)(w, xm, ym)
  )
  total = jax.grad(lambda p: ce(p, xb, yb) + 0.7 * ce(p, xm, ym))(w)
  np.testing.assert_allclose(updates["kernel"], -0.1 * total["kernel"], rtol=1e-6, atol=1e-7)


def test_er_absent_or_zero_replay_is_identity():
  params = make_params()
  g = normal_like(params)
  tx = experience_replay()
  state = tx.init(params)
  same, _ = tx.update(g, state, params)
  assert same is g
  zero, _ = tx.update(g, state, params, replay_grads=jax.tree.map(jnp.zeros_like, g))
  np.testing.assert_array_equal(_flat(zero), _flat(g))


def test_er_non_finite_passes_through():
  params = make_params()
  g, r = normal_like(params, 1), normal_like(params, 2)
  r = {**r, "scale": jnp.asarray(jnp.nan)}
  tx = experience_replay()
  got, state = tx.update(g, tx.init(params), params, replay_grads=r)
  np.testing.assert_array_equal(_flat(got), _flat(g))
  assert int(state.replay_steps) == 0


def test_er_bad_replay_tree_is_named():
  params = make_params()
  tx = experience_replay()
  with pytest.raises(ValueError, match="experience_replay: `replay_grads` must be a pytree"):
    tx.update(normal_like(params), tx.init(params), params, replay_grads={"w": jnp.zeros(2)})


def test_er_negative_strength_is_named():
  with pytest.raises(ValueError, match="experience_replay"):
    experience_replay(-1.0)


def test_er_bfloat16_keeps_dtype():
  params = make_params(jnp.bfloat16)
  g, r = normal_like(params, 1), normal_like(params, 2)
  tx = experience_replay(0.5)
  got, _ = tx.update(g, tx.init(params), params, replay_grads=r)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
  np.testing.assert_allclose(_flat(got), _flat(g) + 0.5 * _flat(r), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("jit", [True, False])
def test_er_same_with_and_without_jit(jit):
  params = make_params()
  tx = optax.chain(experience_replay(0.5), optax.adam(0.1))
  state = tx.init(params)
  g, r = normal_like(params, 1), normal_like(params, 2)
  update = lambda g, s, p, r: tx.update(g, s, p, replay_grads=r)  # noqa: E731
  got, _ = (jax.jit(update) if jit else update)(g, state, params, r)
  ref_adam, _ = optax.adam(0.1).update(
    jax.tree.map(lambda a, b: a + 0.5 * b, g, r), optax.adam(0.1).init(params), params
  )
  np.testing.assert_allclose(_flat(got), _flat(ref_adam), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ der_logit_mse


def _der_reference(z, stored, w=None):
  d = np.mean((np.asarray(z, np.float64) - np.asarray(stored, np.float64)) ** 2, axis=-1)
  if w is None:
    return d.mean()
  w = np.asarray(w, np.float64)
  return (w * d).sum() / w.sum() if w.sum() else 0.0


def test_der_matches_reference():
  k = jax.random.split(jax.random.key(1), 2)
  z, s = jax.random.normal(k[0], (6, 10)), jax.random.normal(k[1], (6, 10))
  np.testing.assert_allclose(der_logit_mse(z, s), _der_reference(z, s), rtol=1e-6)
  w = jnp.array([1, 0, 1, 1, 0, 0], bool)
  np.testing.assert_allclose(der_logit_mse(z, s, weights=w), _der_reference(z, s, w), rtol=1e-6)


def test_der_gradient_is_the_paper_one_and_the_target_is_fixed():
  z, s = jnp.array([[1.0, -2.0, 0.5]]), jnp.array([[0.0, 1.0, 0.5]])
  gz, gs = jax.grad(der_logit_mse, argnums=(0, 1))(z, s)
  np.testing.assert_allclose(gz, 2.0 * (z - s) / 3.0, rtol=1e-6)  # d/dz mean_c (z - s)^2
  np.testing.assert_array_equal(gs, 0.0)


def test_der_empty_memory_is_zero_with_finite_gradient():
  z, s = jnp.ones((4, 3)), jnp.zeros((4, 3))
  w = jnp.zeros(4, bool)
  assert float(der_logit_mse(z, s, weights=w)) == 0.0
  g = jax.grad(lambda z: der_logit_mse(z, s, weights=w))(z)
  np.testing.assert_array_equal(g, 0.0)


def test_der_shape_mismatch_is_named():
  with pytest.raises(ValueError, match="der_logit_mse: `logits` and `memory_logits`"):
    der_logit_mse(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


# --------------------------------------------------------------- lwf_distillation


def _lwf_reference(z, t, T, mask=None, w=None):
  z, t = np.asarray(z, np.float64) / T, np.asarray(t, np.float64) / T
  rows = []
  for zi, ti in zip(z.reshape(-1, z.shape[-1]), t.reshape(-1, t.shape[-1])):
    m = np.ones_like(zi, bool) if mask is None else np.broadcast_to(mask, zi.shape)
    if not m.any():
      rows.append(0.0)
      continue
    p = np.exp(ti[m] - ti[m].max())
    p /= p.sum()
    logq = zi[m] - zi[m].max() - np.log(np.exp(zi[m] - zi[m].max()).sum())
    rows.append(-(p * logq).sum())
  rows = np.asarray(rows)
  if w is None:
    return rows.mean()
  w = np.asarray(w, np.float64).ravel()
  return (w * rows).sum() / w.sum()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_lwf_matches_reference(T):
  k = jax.random.split(jax.random.key(2), 2)
  z, t = 3 * jax.random.normal(k[0], (5, 10)), 3 * jax.random.normal(k[1], (5, 10))
  np.testing.assert_allclose(lwf_distillation(z, t, temperature=T), _lwf_reference(z, t, T),
                             rtol=1e-5)  # fmt: skip
  mask = np.arange(10) < 4  # the old classes
  w = np.array([1.0, 0.0, 2.0, 1.0, 1.0])
  np.testing.assert_allclose(
    lwf_distillation(z, t, temperature=T, where=mask, weights=w),
    _lwf_reference(z, t, T, mask, w),
    rtol=1e-5,
  )


@pytest.mark.slow
def test_lwf_minimised_by_the_teacher_and_ignores_new_units():
  t = jnp.array([[2.0, -1.0, 0.5, 9.0]])
  mask = jnp.array([True, True, True, False])
  g = jax.grad(lambda z: lwf_distillation(z, t, where=mask))(t + jnp.array([[0, 0, 0, -30.0]]))
  np.testing.assert_allclose(g, 0.0, atol=1e-6)  # z = t on the old units: a stationary point
  assert float(lwf_distillation(t, t, where=mask)) < float(lwf_distillation(-t, t, where=mask))


@pytest.mark.slow
def test_lwf_no_old_unit_is_zero_with_finite_gradient():
  z, t = jnp.ones((2, 3)), jnp.zeros((2, 3))
  mask = jnp.zeros(3, bool)  # class-IL, first task: nothing to distil
  assert float(lwf_distillation(z, t, where=mask)) == 0.0
  g = jax.grad(lambda z: lwf_distillation(z, t, where=mask))(z)
  np.testing.assert_array_equal(g, 0.0)


def test_lwf_per_head_rows_and_jit():
  """Leading axes are examples (e.g. [heads, batch]); jit gives the same value."""
  k = jax.random.split(jax.random.key(3), 2)
  z, t = jax.random.normal(k[0], (3, 4, 2)), jax.random.normal(k[1], (3, 4, 2))
  got = jax.jit(lambda z, t: lwf_distillation(z, t))(z, t)
  np.testing.assert_allclose(got, _lwf_reference(z, t, 2.0), rtol=1e-5)
