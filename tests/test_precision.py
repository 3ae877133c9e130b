"""NCL (diagonal and Kronecker-factored) against numpy references and the paper's equations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cl_optax
from cl_optax.importance import KronFactors

from conftest import normal_tree, psd

D_IN, D_OUT = 4, 3


def _layer(seed, bias=True):
  shapes = {"kernel": (D_IN, D_OUT)} | ({"bias": (D_OUT,)} if bias else {})
  return {"dense": normal_tree(seed, shapes)}


def _bar(layer):
  k = np.asarray(layer["dense"]["kernel"], np.float64)
  if "bias" in layer["dense"]:
    return np.concatenate([k, np.asarray(layer["dense"]["bias"], np.float64)[None]], 0)
  return k


def _np_nearest(a1, g1, a2, g2):
  pi = np.sqrt(np.trace(g1) * np.trace(a2) / (np.trace(g2) * np.trace(a1)))
  return a1 + a2 / pi, g1 + pi * g2


def _np_damped(a, g, alpha):
  pi = np.sqrt((np.trace(g) / len(g)) / (np.trace(a) / len(a)))
  return a + alpha / pi * np.eye(len(a)), g + alpha * pi * np.eye(len(g))


# ------------------------------------------------------------------ diagonal


@pytest.mark.parametrize("pre", [False, True])
def test_diag_matches_numpy(pre):
  n, lam, alpha, gamma = 50.0, 0.7, 0.2, 0.9
  params = _layer(0)
  f = jax.tree.map(lambda p: jnp.abs(p) * 2.0, _layer(1))
  theta, g = _layer(2), _layer(3)
  tx = cl_optax.ncl(n, strength=lam, damping=alpha, decay=gamma, precondition_penalty=pre)
  state = cl_optax.consolidate(tx.init(params), params, precision=f)
  got, _ = jax.jit(tx.update)(g, state, theta)
  for name in ("kernel", "bias"):
    lam_k = gamma / n + np.asarray(f["dense"][name], np.float64)
    gg, th = np.asarray(g["dense"][name], np.float64), np.asarray(theta["dense"][name], np.float64)
    diff = th - np.asarray(params["dense"][name], np.float64)
    if pre:
      want = (gg + lam * lam_k * diff) / (lam_k + alpha**2) / n
    else:
      want = (gg / (lam_k + alpha**2) + lam * diff) / n
    np.testing.assert_allclose(got["dense"][name], want, rtol=1e-5, atol=1e-6)


def test_first_task_is_official_prior():
  # before any consolidate: Lambda_0 = I/N, mu_0 = 0 -> delta = (g/(1/N + a^2) + lam theta)/N
  n, lam, alpha = 100.0, 1.0, 1e-3
  theta, g = _layer(0), _layer(1)
  got, _ = cl_optax.ncl(n, strength=lam, damping=alpha).update(
    g, cl_optax.ncl(n, strength=lam, damping=alpha).init(theta), theta
  )
  want = jax.tree.map(lambda gg, t: (gg / (1 / n + alpha**2) + lam * t) / n, g, theta)
  chex.assert_trees_all_close(got, want, rtol=1e-5)
  tx = cl_optax.ncl(n, strength=lam, damping=alpha, prior_mean="init")
  got, _ = tx.update(g, tx.init(theta), theta)
  chex.assert_trees_all_close(got, jax.tree.map(lambda gg: gg / (1 + n * alpha**2), g), rtol=1e-5)


@pytest.mark.parametrize("precision", ["diag", "kfac"])
def test_identity_precision_at_mean_is_plain_gradient(precision):
  theta, g = _layer(0), _layer(1)
  kw = {"layers": ["dense"]} if precision == "kfac" else {}
  tx = cl_optax.ncl(1.0, strength=1.0, damping=0.0, decay=0.0, precision=precision, **kw)
  if precision == "kfac":
    prec = {"dense": KronFactors(jnp.eye(D_IN + 1), jnp.eye(D_OUT))}
  else:
    prec = jax.tree.map(jnp.ones_like, theta)
  state = cl_optax.consolidate(tx.init(theta), theta, precision=prec)
  got, _ = jax.jit(tx.update)(g, state, theta)
  chex.assert_trees_all_close(got, g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Kronecker


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pre", [False, True])
def test_kfac_matches_dense_numpy_solve(bias, pre):
  n, lam, alpha, gamma = 20.0, 0.6, 0.3, 0.8
  params, theta, g = _layer(0, bias), _layer(1, bias), _layer(2, bias)
  d_in = D_IN + bias
  a_new, g_new = psd(3, d_in), psd(4, D_OUT)
  tx = cl_optax.ncl(
    n,
    strength=lam,
    damping=alpha,
    decay=gamma,
    precision="kfac",
    layers=["dense"],
    precondition_penalty=pre,
  )
  state = cl_optax.consolidate(
    tx.init(params), params, precision={"dense": KronFactors(a_new, g_new)}
  )
  got, _ = jax.jit(tx.update)(g, state, theta)

  a0, g0 = np.eye(d_in) / np.sqrt(n), np.eye(D_OUT) / np.sqrt(n)
  a, gg = _np_nearest(gamma * a0, g0, a_new.astype(np.float64), g_new.astype(np.float64))
  st = optax.tree.get(state, "kron")["dense"]
  np.testing.assert_allclose(st.a, a, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(st.g, gg, rtol=1e-5, atol=1e-7)
  a_s, g_s = _np_damped(a, gg, alpha)
  # full matrices in the row-major vec of [in(+1), out]: (A (x) G) vec(X) = vec(A X G)
  lam_full, p_full = np.kron(a, gg), np.linalg.inv(np.kron(a_s, g_s))
  grad, diff = _bar(g).ravel(), (_bar(theta) - _bar(params)).ravel()
  if pre:
    want = p_full @ (grad + lam * lam_full @ diff) / n
  else:
    want = (p_full @ grad + lam * diff) / n
  want = want.reshape(d_in, D_OUT)
  np.testing.assert_allclose(got["dense"]["kernel"], want[:D_IN], rtol=1e-4, atol=1e-5)
  if bias:
    np.testing.assert_allclose(got["dense"]["bias"], want[D_IN], rtol=1e-4, atol=1e-5)


def test_kfac_prior_accumulates_over_tasks():
  n, gamma = 10.0, 0.5
  params = _layer(0)
  tx = cl_optax.ncl(n, decay=gamma, precision="kfac", layers=["dense"])
  state = tx.init(params)
  a, g = np.eye(D_IN + 1) / np.sqrt(n), np.eye(D_OUT) / np.sqrt(n)
  for k in range(3):
    new = KronFactors(psd(10 + k, D_IN + 1), psd(20 + k, D_OUT))
    state = cl_optax.consolidate(state, _layer(k), precision={"dense": new})
    a, g = _np_nearest(gamma * a, g, new.a.astype(np.float64), new.g.astype(np.float64))
  kron = state.kron["dense"]
  np.testing.assert_allclose(kron.a, a, rtol=1e-4)
  np.testing.assert_allclose(kron.g, g, rtol=1e-4)
  chex.assert_trees_all_close(state.prior_mean, jax.tree.map(np.asarray, _layer(2)))


def test_singular_precision_is_kept_positive_definite_by_damping():
  theta, g = _layer(0), _layer(1)
  alpha = 0.5
  # diagonal: Lambda = 0 exactly (decay 0, zero Fisher) -> g / alpha^2
  tx = cl_optax.ncl(1.0, strength=0.0, damping=alpha, decay=0.0)
  state = cl_optax.consolidate(tx.init(theta), theta, precision=jax.tree.map(jnp.zeros_like, g))
  got, _ = tx.update(g, state, theta)
  chex.assert_trees_all_close(got, jax.tree.map(lambda x: x / alpha**2, g), rtol=1e-6)
  # Kronecker: rank-one (singular) factors -> finite, equal to the damped dense solve
  tx = cl_optax.ncl(1.0, strength=0.0, damping=alpha, decay=0.0, precision="kfac", layers=["dense"])
  a1, g1 = psd(0, D_IN + 1, rank=1), psd(1, D_OUT, rank=1)
  state = cl_optax.consolidate(tx.init(theta), theta, precision={"dense": KronFactors(a1, g1)})
  got, _ = tx.update(g, state, theta)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
  a_s, g_s = _np_damped(a1.astype(np.float64), g1.astype(np.float64), alpha)
  want = np.linalg.solve(np.kron(a_s, g_s), _bar(g).ravel()).reshape(D_IN + 1, D_OUT)
  np.testing.assert_allclose(got["dense"]["kernel"], want[:D_IN], rtol=1e-3, atol=1e-4)


@settings(deadline=None, max_examples=12)
@given(
  seed=st.integers(0, 2**16),
  radius=st.floats(1e-3, 10.0),
  scale=st.floats(1e-2, 1e2),
  kfac=st.booleans(),
)
def test_trust_region_norm_never_exceeds_radius(seed, radius, scale, kfac):
  theta, params = _layer(seed), _layer(seed + 1)
  g = jax.tree.map(lambda x: scale * x, _layer(seed + 2))
  if kfac:
    tx = _KF_TX
    prec = {"dense": KronFactors(psd(seed, D_IN + 1), psd(seed + 1, D_OUT))}
  else:
    tx = _DIAG_TX
    prec = jax.tree.map(lambda x: jnp.abs(x) + 0.1, _layer(seed + 3))
  state = cl_optax.consolidate(tx.init(params), params, precision=prec)
  state = optax.tree.set(state, hyperparams=dict(state.hyperparams, radius=jnp.float32(radius)))
  got, state = _jit_update(tx)(g, state, theta)
  inner = state.inner_state
  if kfac:
    k = inner.kron["dense"]
    d = jnp.concatenate([got["dense"]["kernel"], got["dense"]["bias"][None]], 0)
    sq = jnp.sum(d * (k.a @ d @ k.g))
  else:
    sq = sum(
      jnp.sum(f * u**2)
      for f, u in zip(jax.tree.leaves(inner.prior_precision), jax.tree.leaves(got))
    )
  assert float(jnp.sqrt(sq)) <= radius * (1 + 1e-4)


_DIAG_TX = optax.inject_hyperparams(cl_optax.ncl, static_args=("precision", "layers"))(
  1.0, strength=1.0, damping=0.01, radius=1.0
)
_KF_TX = optax.inject_hyperparams(cl_optax.ncl, static_args=("precision", "layers"))(
  1.0, strength=1.0, damping=0.01, radius=1.0, precision="kfac", layers=("dense",)
)
_JITTED = {}


def _jit_update(tx):
  return _JITTED.setdefault(id(tx), jax.jit(tx.update))


def test_radius_clips_only_when_needed():
  theta, g = _layer(0), _layer(1)
  prec = jax.tree.map(jnp.ones_like, theta)
  big = cl_optax.ncl(1.0, strength=0.0, damping=0.0, decay=0.0, radius=1e6)
  state = cl_optax.consolidate(big.init(theta), theta, precision=prec)
  chex.assert_trees_all_close(big.update(g, state, theta)[0], g, rtol=1e-6)
  small = cl_optax.ncl(1.0, strength=0.0, damping=0.0, decay=0.0, radius=0.1)
  got = small.update(g, state, theta)[0]
  norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g)))
  chex.assert_trees_all_close(got, jax.tree.map(lambda x: x * 0.1 / norm, g), rtol=1e-5)


def test_kfac_with_diagonal_leaves_outside_the_layers():
  n, lam, alpha = 5.0, 0.5, 0.1
  params = {"dense": _layer(0)["dense"], "scale": jnp.array([1.0, -2.0])}
  theta = {"dense": _layer(1)["dense"], "scale": jnp.array([0.5, 0.5])}
  g = {"dense": _layer(2)["dense"], "scale": jnp.array([1.0, 3.0])}
  tx = cl_optax.ncl(n, strength=lam, damping=alpha, precision="kfac", layers=["dense"])
  kf = {"dense": KronFactors(psd(0, D_IN + 1), psd(1, D_OUT)), "scale": jnp.array([2.0, 0.0])}
  state = cl_optax.consolidate(tx.init(params), params, precision=kf)
  got, _ = jax.jit(tx.update)(g, state, theta)
  lam_s = 1 / n + np.array([2.0, 0.0])
  want = (np.array([1.0, 3.0]) / (lam_s + alpha**2) + lam * (theta["scale"] - params["scale"])) / n
  np.testing.assert_allclose(got["scale"], want, rtol=1e-5)
  with pytest.raises(ValueError, match="no diagonal leaf 'scale'"):
    cl_optax.consolidate(state, params, precision={"dense": kf["dense"]})


def test_errors_are_explicit():
  theta = _layer(0)
  tx = cl_optax.ncl(1.0)
  with pytest.raises(ValueError, match="ncl: consolidate needs the signal `precision=`"):
    cl_optax.consolidate(tx.init(theta), theta)
  neg = jax.tree.map(lambda x: -jnp.ones_like(x), theta)
  with pytest.raises(ValueError, match="ncl: `precision` leaf .* negative"):
    cl_optax.consolidate(tx.init(theta), theta, precision=neg)
  kt = cl_optax.ncl(1.0, precision="kfac", layers=["dense"])
  bad = {"dense": KronFactors(-np.eye(D_IN + 1, dtype=np.float32), np.eye(D_OUT))}
  with pytest.raises(ValueError, match="negative eigenvalue"):
    cl_optax.consolidate(kt.init(theta), theta, precision=bad)
  with pytest.raises(ValueError, match=r"has shape \(3, 3\); expected \(5, 5\)"):
    cl_optax.consolidate(
      kt.init(theta), theta, precision={"dense": KronFactors(np.eye(3), np.eye(D_OUT))}
    )
  with pytest.raises(ValueError, match="no KronFactors.* for layer 'dense'"):
    cl_optax.consolidate(kt.init(theta), theta, precision={"other": KronFactors(1, 1)})
  with pytest.raises(
    ValueError, match=r"ncl: the layer selector \['nope'\] selects no dense.*\['dense'\]"
  ):
    cl_optax.ncl(1.0, precision="kfac", layers=["nope"]).init(theta)
  with pytest.raises(ValueError, match="needs `layers=`"):
    cl_optax.ncl(1.0, precision="kfac")
  with pytest.raises(ValueError, match="'diag' or 'kfac'"):
    cl_optax.ncl(1.0, precision="full")
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(theta, tx.init(theta))
