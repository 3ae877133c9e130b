"""cl_optax.importance.spg against a plain-numpy SPG (official-code semantics)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cl_optax
from cl_optax.importance import Batches, stack_batches

from conftest import classification_batches, normal_tree

N_BATCH, BATCH, D, H, C, T = 3, 8, 5, 6, 3, 3


def logits_fn(p, x, head):
  h = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  return h @ p["heads"]["w"][head] + p["heads"]["b"][head]


SHAPES = {"trunk": {"w": (D, H), "b": (H,)}, "heads": {"w": (T, H, C), "b": (T, C)}, "unused": (4,)}
_data = functools.partial(classification_batches, n_batch=N_BATCH, batch=BATCH, dim=D, classes=C)


def _numpy_grads(p, x, y, head, is_current):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  h = np.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  logits = h @ p["heads"]["w"][head] + p["heads"]["b"][head]
  if is_current:
    z = np.exp(logits - logits.max(1, keepdims=True))
    dlogits = (z / z.sum(1, keepdims=True) - np.eye(C)[np.asarray(y)]) / len(x)
  else:
    dlogits = np.ones_like(logits)
  g = jax.tree.map(np.zeros_like, p)
  g["heads"]["w"][head] = h.T @ dlogits
  g["heads"]["b"][head] = dlogits.sum(0)
  dpre = (dlogits @ p["heads"]["w"][head].T) * (1 - h**2)
  g["trunk"]["w"] = x.T @ dpre
  g["trunk"]["b"] = dpre.sum(0)
  return g


def _numpy_spg(p, xs, ys, task):
  def gamma(g):
    g = np.asarray(g, np.float64)
    if g.size < 2 or g.std(ddof=1) == 0:
      return np.zeros_like(g)
    return np.abs(np.tanh((g - g.mean()) / g.std(ddof=1)))

  out = None
  for head in range(task + 1):
    total = None
    for x, y in zip(xs, ys):
      g = _numpy_grads(p, x, y, head, head == task)
      total = g if total is None else jax.tree.map(np.add, total, g)
    gam = jax.tree.map(gamma, total)
    out = gam if out is None else jax.tree.map(np.maximum, out, gam)
  return out


@pytest.mark.slow
@settings(deadline=None, max_examples=10)
@given(st.integers(0, 2**16), st.integers(0, T - 1))
def test_spg_matches_numpy(seed, task):
  p = normal_tree(seed, SHAPES)
  xs, ys = _data(seed + 1)
  got = cl_optax.importance.spg(logits_fn, p, Batches(xs, ys), task=task)
  want = _numpy_spg(p, xs, ys, task)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)
  for leaf in jax.tree.leaves(got):
    assert np.all((np.asarray(leaf) >= 0) & (np.asarray(leaf) <= 1))


@pytest.mark.slow
def test_iterable_equals_stacked():
  p = normal_tree(0, SHAPES)
  xs, ys = _data(1)
  stacked = cl_optax.importance.spg(logits_fn, p, Batches(xs, ys), task=2)
  iterable = cl_optax.importance.spg(logits_fn, p, stack_batches(zip(xs, ys)), task=2)
  chex.assert_trees_all_close(stacked, iterable, rtol=1e-5, atol=1e-6)


def test_constant_gradient_tensor_gets_zero_not_nan():
  p = normal_tree(0, SHAPES)
  imp = cl_optax.importance.spg(logits_fn, p, Batches(*_data(1)), task=1)
  np.testing.assert_array_equal(imp["unused"], 0.0)  # all-zero gradient
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(imp))


def test_feeds_consolidate():
  p = normal_tree(0, SHAPES)
  imp = cl_optax.importance.spg(logits_fn, p, Batches(*_data(1)), task=0)
  state = cl_optax.soft_mask().init(p)
  state = cl_optax.consolidate(state, p, importance=imp)
  chex.assert_trees_all_close(state.importance, imp)


@pytest.mark.parametrize("task", [-1, 1.0, "0"])
def test_bad_task_is_named(task):
  with pytest.raises(ValueError, match="spg: `task` must be a non-negative int"):
    cl_optax.importance.spg(logits_fn, normal_tree(0, SHAPES), Batches(*_data(1)), task=task)


def test_empty_batches_is_named():
  xs, ys = _data(1)
  with pytest.raises(ValueError, match="spg: `batches` is empty"):
    cl_optax.importance.spg(logits_fn, normal_tree(0, SHAPES), Batches(xs[:0], ys[:0]), task=0)
