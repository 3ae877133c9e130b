"""Estimators fisher_diag, mas, kfac_factors against plain numpy on linear models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cl_optax
from cl_optax.importance import Batches, KronFactors, stack_batches

from conftest import classification_batches, normal_tree

N_BATCH, BATCH, D, C = 2, 6, 4, 3


SHAPES = {"dense": {"kernel": (D, C), "bias": (C,)}}
_data = functools.partial(classification_batches, n_batch=N_BATCH, batch=BATCH, dim=D, classes=C)


def logits_fn(p, x):
  return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def tapped(p, x, taps):
  return logits_fn(p, x) + taps["dense"], {"dense": x}


def _np(p, xs, ys):
  w = np.asarray(p["dense"]["kernel"], np.float64)
  b = np.asarray(p["dense"]["bias"], np.float64)
  x = np.asarray(xs, np.float64).reshape(-1, D)
  y = np.asarray(ys).reshape(-1)
  z = x @ w + b
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  return x, y, z, prob


def _score(x, prob, c):
  """Per-example gradient of -log p(c|x) w.r.t. (kernel, bias): (x (p - e_c), p - e_c)."""
  d = prob - np.eye(C)[c]
  return np.einsum("ni,nj->nij", x, d), d


def test_fisher_diag_empirical_matches_numpy():
  p = normal_tree(0, SHAPES)
  xs, ys = _data(1)
  got = cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="empirical")
  x, y, _, prob = _np(p, xs, ys)
  gk, gb = _score(x, prob, y)
  np.testing.assert_allclose(got["dense"]["kernel"], (gk**2).mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["dense"]["bias"], (gb**2).mean(0), rtol=1e-5, atol=1e-7)
  # not the square of a batch-mean gradient (the common bug): that is ~B times smaller
  batch_mean_sq = np.mean([(gk[i : i + BATCH].mean(0)) ** 2 for i in (0, BATCH)], 0)
  assert not np.allclose(got["dense"]["kernel"], batch_mean_sq, rtol=0.1)


def test_fisher_diag_exact_matches_numpy_and_iterable_equals_stacked():
  p = normal_tree(2, SHAPES)
  xs, ys = _data(3)
  got = cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="exact")
  x, _, _, prob = _np(p, xs, ys)
  want_k = sum(
    prob[:, c, None, None] * _score(x, prob, np.full(len(x), c))[0] ** 2 for c in range(C)
  )
  want_b = sum(prob[:, c, None] * _score(x, prob, np.full(len(x), c))[1] ** 2 for c in range(C))
  np.testing.assert_allclose(got["dense"]["kernel"], want_k.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["dense"]["bias"], want_b.mean(0), rtol=1e-5, atol=1e-7)
  listed = cl_optax.importance.fisher_diag(logits_fn, p, stack_batches(zip(xs, ys)), fisher="exact")
  np.testing.assert_allclose(listed["dense"]["kernel"], got["dense"]["kernel"], rtol=1e-6)


def test_fisher_diag_sampled_is_unbiased_for_the_exact():
  p = normal_tree(4, SHAPES)
  xs, ys = _data(5, n_batch=1, batch=4000)
  exact = cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="exact")
  sampled = cl_optax.importance.fisher_diag(
    logits_fn, p, Batches(xs, ys), fisher="sampled", key=jax.random.key(0)
  )
  np.testing.assert_allclose(sampled["dense"]["kernel"], exact["dense"]["kernel"], rtol=0.15)


def test_mas_matches_numpy():
  p = normal_tree(6, SHAPES)
  xs, ys = _data(7)
  got = cl_optax.importance.mas_sensitivity(logits_fn, p, Batches(xs, ys))
  x, _, z, _ = _np(p, xs, ys)
  # d ||z||^2 / dW = 2 x z^T per example; d/db = 2 z
  np.testing.assert_allclose(
    got["dense"]["kernel"], np.abs(2 * np.einsum("ni,nj->nij", x, z)).mean(0), rtol=1e-5
  )
  np.testing.assert_allclose(got["dense"]["bias"], np.abs(2 * z).mean(0), rtol=1e-5)
  unlabelled = cl_optax.importance.mas_sensitivity(logits_fn, p, Batches(xs))
  np.testing.assert_allclose(unlabelled["dense"]["bias"], got["dense"]["bias"], rtol=1e-6)


def _exact_fisher_block(x, prob):
  """Full Fisher of vec_row([kernel; bias]) ([D+1, C] flattened row-major)."""
  abar = np.concatenate([x, np.ones((len(x), 1))], 1)
  total = np.zeros(((D + 1) * C, (D + 1) * C))
  for c in range(C):
    d = prob - np.eye(C)[c]
    v = np.einsum("ni,nj->nij", abar, d).reshape(len(x), -1)
    total += np.einsum("n,ni,nj->ij", prob[:, c], v, v)
  return total / len(x)


def test_kfac_factors_equal_exact_fisher_when_factorisation_is_exact():
  # zero weights: p(y|x) is uniform for every x, so E[a a^T (x) g g^T] factorises
  p = jax.tree.map(jnp.zeros_like, normal_tree(8, SHAPES))
  xs, ys = _data(9)
  kf = cl_optax.importance.kfac_factors(
    tapped, p, Batches(xs, ys), layers=["dense"], fisher="exact"
  )
  x, _, _, prob = _np(p, xs, ys)
  np.testing.assert_allclose(
    np.kron(kf["dense"].a, kf["dense"].g), _exact_fisher_block(x, prob), rtol=1e-5, atol=1e-7
  )
  diag = cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="exact")
  kdiag = np.outer(np.diag(kf["dense"].a), np.diag(kf["dense"].g))
  np.testing.assert_allclose(kdiag[:D], diag["dense"]["kernel"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(kdiag[D], diag["dense"]["bias"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_kfac_factors_match_numpy_definitions(fisher):
  p = normal_tree(10, SHAPES)
  xs, ys = _data(11)
  kf = cl_optax.importance.kfac_factors(tapped, p, Batches(xs, ys), layers=["dense"], fisher=fisher)
  x, y, _, prob = _np(p, xs, ys)
  abar = np.concatenate([x, np.ones((len(x), 1))], 1)
  np.testing.assert_allclose(kf["dense"].a, abar.T @ abar / len(x), rtol=1e-5, atol=1e-6)
  if fisher == "empirical":
    d = prob - np.eye(C)[y]
    want_g = d.T @ d / len(x)
  else:
    want_g = sum(
      (prob[:, c, None] * (prob - np.eye(C)[c])).T @ (prob - np.eye(C)[c]) for c in range(C)
    ) / len(x)
  np.testing.assert_allclose(kf["dense"].g, want_g, rtol=1e-5, atol=1e-7)
  assert isinstance(kf["dense"], KronFactors)


def test_estimator_errors():
  p = normal_tree(0, SHAPES)
  xs, ys = _data(1)
  with pytest.raises(ValueError, match="pass `key=`"):
    cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="sampled")
  with pytest.raises(ValueError, match="must be one of"):
    cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs, ys), fisher="true")
  with pytest.raises(ValueError, match="is empty"):
    cl_optax.importance.mas_sensitivity(logits_fn, p, Batches(xs[:0]))
  with pytest.raises(ValueError, match="fisher_diag: needs labels; got Batches with y=None"):
    cl_optax.importance.fisher_diag(logits_fn, p, Batches(xs))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"kfac_factors: the layer selector \['nope'\] selects no"):
    cl_optax.importance.kfac_factors(tapped, p, Batches(xs, ys), layers=["nope"], key=key)
  with pytest.raises(ValueError, match="kfac_factors: the layer selector \\[\\] selects no"):
    cl_optax.importance.kfac_factors(tapped, p, Batches(xs, ys), layers=[], key=key)
