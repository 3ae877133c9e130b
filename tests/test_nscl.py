"""Adam-NSCL (`cl_optax.nscl`): numpy references for the covariance, null space and projector."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax


def _np_projector(c, a, normalize):
  """The code's rule in float64: eigenvalue <= a * lambda_min, lambda_min floored at d eps32 max."""
  lam, vec = np.linalg.eigh(np.asarray(c, np.float64))
  floor = len(lam) * np.finfo(np.float32).eps * lam[-1]
  u0 = vec[:, lam <= a * max(lam[0], floor)]
  p = u0 @ u0.T
  return (p / np.linalg.norm(p) if normalize else p), u0.shape[1]


def _spectrum(seed, d, values):
  """A symmetric matrix with the given eigenvalues (well separated: the null space is clear)."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return (q * np.asarray(values)) @ q.T


@pytest.mark.parametrize("normalize", [True, False])
def test_null_space_projector_matches_numpy(normalize):
  values = [0.01, 0.02, 0.05, 0.3, 1.0, 2.0, 5.0, 9.0]  # a = 10: the first three (<= 0.1)
  c = _spectrum(0, 8, values)
  p, k0 = cl_optax.null_space_projector(jnp.asarray(c, jnp.float32), 10.0, normalize)
  ref, k_ref = _np_projector(c, 10.0, normalize)
  assert int(k0) == k_ref == 3
  np.testing.assert_allclose(p, ref, atol=2e-5)
  # the Frobenius normalisation divides the projector by sqrt(k0)
  scale = np.sqrt(3) if normalize else 1.0
  np.testing.assert_allclose(np.asarray(p) @ np.asarray(p) * scale, np.asarray(p), atol=2e-5)


def test_rank_deficient_float32_covariance_keeps_the_exact_null_space():
  # MNIST-like: 3 input coordinates are always 0, so lambda_min = 0 (float32 noise of either sign)
  x = np.random.default_rng(1).normal(size=(50, 12)).astype(np.float32)
  x[:, [0, 5, 9]] = 0.0
  c = jnp.asarray(x.T @ x * 1e3)
  p, k0 = cl_optax.null_space_projector(c, 10.0, False)
  assert int(k0) == 3
  expected = np.zeros((12, 12))
  expected[[0, 5, 9], [0, 5, 9]] = 1.0
  np.testing.assert_allclose(p, expected, atol=1e-5)


def test_consolidate_accumulates_per_sample_and_batch_mean_covariance():
  rng = np.random.default_rng(2)
  x1, x2 = rng.normal(size=(12, 5)), rng.normal(size=(8, 5))
  params = {"k": jnp.zeros((5, 2))}
  tx = cl_optax.nscl(10.0, normalize=False)
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, representations={"k": jnp.asarray(x1)})
  state = cl_optax.consolidate(state, params, representations={"k": jnp.asarray(x2)})
  np.testing.assert_allclose(state.nscl_covariance["k"], x1.T @ x1 + x2.T @ x2, rtol=1e-5)
  ref, k0 = _np_projector(x1.T @ x1 + x2.T @ x2, 10.0, False)
  assert int(state.nscl_count["k"]) == 5 - k0
  g = rng.normal(size=(5, 2))
  np.testing.assert_allclose(tx.update({"k": jnp.asarray(g)}, state)[0]["k"], ref @ g, atol=2e-5)
  # the code's covariance: sum over training batches of the batch-mean outer product
  means = cl_optax.nscl_batch_means(jnp.asarray(x1), 4)
  loop = sum(np.outer(x1[i : i + 4].mean(0), x1[i : i + 4].mean(0)) for i in range(0, 12, 4))
  fresh = cl_optax.consolidate(tx.init(params), params, representations={"k": means})
  np.testing.assert_allclose(fresh.nscl_covariance["k"], loop, rtol=1e-5)
  assert cl_optax.nscl_batch_means(jnp.zeros((10, 3, 3, 2)), 4).shape == (2, 3, 3, 2)


@pytest.mark.parametrize("normalize", [True, False])
def test_update_after_adam_is_the_projected_adam_step(normalize):
  rng = np.random.default_rng(3)
  params = {"k": jnp.zeros((6, 3)), "b": jnp.zeros((3,)), "weight": jnp.zeros((3, 6))}
  layers = {"k": True, "b": False, "weight": True}
  tx = optax.chain(optax.adam(0.1), cl_optax.nscl(10.0, normalize=normalize, layers=layers))
  plain = optax.adam(0.1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  state, ref_state = tx.init(params), plain.init(params)
  u0, _ = tx.update(grads, state, params)  # before any consolidate: Adam's step unchanged
  r0, _ = plain.update(grads, ref_state, params)
  jax.tree.map(lambda u, r: np.testing.assert_allclose(u, r, rtol=1e-6), u0, r0)
  x = rng.normal(size=(4, 6))  # 4 samples in 6 dims: a 2-dim exact null space
  reps = {"k": jnp.asarray(x), "weight": jnp.asarray(x)}
  state = cl_optax.consolidate(state, params, representations=reps)
  u, _ = tx.update(grads, state, params)
  p, k0 = _np_projector(x.T @ x, 10.0, normalize)
  assert k0 == 2
  np.testing.assert_allclose(u["k"], p @ np.asarray(r0["k"]), atol=1e-5)
  # a [out, in] weight: W P
  np.testing.assert_allclose(u["weight"], np.asarray(r0["weight"]) @ p.T, atol=1e-5)
  np.testing.assert_allclose(u["b"], r0["b"])  # unprojected, not frozen by default
  # the layer's outputs on the old inputs do not move
  np.testing.assert_allclose(x @ np.asarray(u["k"]), 0.0, atol=1e-5)


def test_no_retrace_across_consolidates_and_non_finite_passes():
  params = {"k": jnp.zeros((4, 2))}
  tx = cl_optax.nscl()
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s, params)[0]

  state = tx.init(params)
  g = {"k": jnp.ones((4, 2))}
  for t in range(3):
    step(g, state)
    x = jnp.eye(4)[t : t + 1]
    state = cl_optax.consolidate(state, params, representations={"k": x})
  step(g, state)
  assert len(traces) == 1
  bad = {"k": g["k"].at[0, 0].set(jnp.nan)}
  out = step(bad, state)["k"]
  assert np.isnan(out[0, 0]) and np.all(out[1:] == 1.0)


def test_conv_kernel_takes_patches_in_its_own_order():
  kernel = jnp.zeros((2, 2, 3, 4))
  params = {"conv": kernel}
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 3))
  reps = cl_optax.conv_representations(x, kernel.shape, padding="VALID")
  state = cl_optax.consolidate(cl_optax.nscl().init(params), params, representations={"conv": reps})
  patches = np.asarray(reps.patches)
  np.testing.assert_allclose(state.nscl_covariance["conv"], patches.T @ patches, rtol=1e-4)
  with pytest.raises(ValueError, match="ConvRepresentations"):
    cl_optax.consolidate(state, params, representations={"conv": patches})


def test_bad_arguments():
  with pytest.raises(ValueError, match="nscl.*a"):
    cl_optax.nscl(0.5)
  with pytest.raises(ValueError, match="nscl_batch_means"):
    cl_optax.nscl_batch_means(jnp.zeros((3, 2)), 4)
  params = {"k": jnp.zeros((3, 2))}
  with pytest.raises(ValueError, match="nscl.*representations"):
    cl_optax.consolidate(cl_optax.nscl().init(params), params)
