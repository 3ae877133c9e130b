"""soft_mask and freeze against plain-numpy references, and their invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cl_optax

from conftest import make_params

SHAPES = jax.tree.map(lambda p: p.shape, make_params())
TREEDEF = jax.tree.structure(make_params())
SETTINGS = settings(deadline=None, max_examples=25)


def _tree_of(elements):
  """A strategy for pytrees shaped like `make_params()` (values drawn)."""
  shapes = jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return st.tuples(*[hnp.arrays(np.float32, s, elements=elements) for s in shapes]).map(
    lambda leaves: jax.tree.unflatten(TREEDEF, leaves)
  )


unit = st.floats(0, 1, width=32, allow_subnormal=False)  # XLA flushes denormals
finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


def _soft_mask_reference(grads, importances, head=None):
  """Plain numpy: A = max over tasks; u = (1 - A) g; heads scaled by 1 - mean(A)."""
  acc = jax.tree.map(lambda g: np.zeros(np.shape(g), np.float32), grads)
  for imp in importances:
    acc = jax.tree.map(lambda a, i: np.maximum(a, np.asarray(i)), acc, imp)
  head = head or {}
  trunk = [np.ravel(a) for k, a in acc.items() if not head.get(k) for a in jax.tree.leaves(a)]
  trunk = np.concatenate(trunk)
  scale = 1.0 - trunk.mean()
  out = {}
  for k in grads:
    if head.get(k):
      out[k] = jax.tree.map(lambda g: np.asarray(g) * scale, grads[k])
    else:
      out[k] = jax.tree.map(lambda g, a: np.asarray(g) * (1 - a), grads[k], acc[k])
  return out


@SETTINGS
@given(_tree_of(finite), st.lists(_tree_of(unit), min_size=1, max_size=3), st.booleans())
def test_soft_mask_matches_numpy(grads, importances, with_head):
  params = make_params()
  head = {k: k == "head" for k in params} if with_head else None
  tx = cl_optax.soft_mask(head=head)
  state = tx.init(params)
  for imp in importances:
    state = cl_optax.consolidate(state, params, importance=imp)
  got, _ = tx.update(grads, state, params)
  want = _soft_mask_reference(grads, importances, head)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(_tree_of(unit), _tree_of(unit))
def test_importance_never_decreases(imp1, imp2):
  params = make_params()
  state = cl_optax.soft_mask().init(params)
  s1 = cl_optax.consolidate(state, params, importance=imp1)
  s2 = cl_optax.consolidate(s1, params, importance=imp2)
  jax.tree.map(
    lambda a, b, i: np.testing.assert_array_equal(b, np.maximum(a, i)),
    s1.importance,
    s2.importance,
    imp2,
  )


@SETTINGS
@given(_tree_of(finite))
def test_importance_one_zeros_and_zero_is_identity(grads):
  params = make_params()
  tx = cl_optax.soft_mask()
  state = tx.init(params)
  same, _ = tx.update(grads, state, params)  # no importance yet: identity
  chex.assert_trees_all_equal(same, grads)
  ones = jax.tree.map(jnp.ones_like, params)
  state = cl_optax.consolidate(state, params, importance=ones)
  zero, _ = tx.update(grads, state, params)
  chex.assert_trees_all_equal(zero, jax.tree.map(jnp.zeros_like, grads))


@SETTINGS
@given(_tree_of(finite), _tree_of(unit))
def test_bfloat16_storage_close_to_float32(grads, imp):
  params = make_params()
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    tx = cl_optax.soft_mask(importance_dtype=dtype)
    state = cl_optax.consolidate(tx.init(params), params, importance=imp)
    assert jax.tree.leaves(state.importance)[0].dtype == dtype
    out[dtype] = tx.update(grads, state, params)[0]
  # |(1 - i_bf16) - (1 - i_f32)| <= 2^-9, relative to the gradient.
  jax.tree.map(
    lambda a, b, g: np.testing.assert_array_less(
      np.abs(np.asarray(a) - np.asarray(b)), 1e-2 * np.abs(np.asarray(g)) + 1e-6
    ),
    out[jnp.bfloat16],
    out[jnp.float32],
    grads,
  )


def test_non_finite_gradients_pass_through_unchanged(params):
  tx = cl_optax.soft_mask()
  ones = jax.tree.map(jnp.ones_like, params)
  state = cl_optax.consolidate(tx.init(params), params, importance=ones)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, jnp.inf), params)
  grads["scale"] = jnp.asarray(jnp.nan)
  got, _ = tx.update(grads, state, params)
  chex.assert_trees_all_equal(got, grads)  # inf * 0 would have been nan


def test_gradient_masking_is_cancelled_by_adam_but_update_masking_is_not(params):
  """Why the docs put soft_mask after adam: adam undoes a constant gradient scale."""
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 0.9), params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
  results = {}
  for name, tx in {
    "adam": optax.adam(0.1),
    "before": optax.chain(cl_optax.soft_mask(), optax.adam(0.1)),
    "after": optax.chain(optax.adam(0.1), cl_optax.soft_mask()),
  }.items():
    state = tx.init(params)
    if name != "adam":
      state = cl_optax.consolidate(state, params, importance=imp)
    results[name] = tx.update(grads, state, params)[0]
  chex.assert_trees_all_close(results["before"], results["adam"], rtol=1e-5)
  chex.assert_trees_all_close(
    results["after"], jax.tree.map(lambda u: 0.1 * u, results["adam"]), rtol=1e-5
  )


# ------------------------------------------------------------------ freeze
@SETTINGS
@given(_tree_of(finite), st.lists(_tree_of(unit), min_size=1, max_size=3), st.floats(0.05, 1.0))
def test_freeze_matches_numpy(grads, importances, threshold):
  params = make_params()
  tx = cl_optax.freeze(threshold=threshold)
  state = tx.init(params)
  for imp in importances:
    state = cl_optax.consolidate(state, params, importance=imp)
  got, _ = tx.update(grads, state, params)
  frozen = jax.tree.map(lambda *i: np.any(np.stack(i) >= np.float32(threshold), 0), *importances)
  want = jax.tree.map(lambda g, f: np.where(f, 0.0, g), grads, frozen)
  chex.assert_trees_all_equal(got, want)


def test_freeze_at_the_threshold_freezes():
  """An entry whose importance equals the threshold freezes; one ulp below does not."""
  t = np.float32(0.3)
  below, above = np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1))
  params = {"w": jnp.zeros(4)}
  tx = cl_optax.freeze(threshold=0.3)
  imp = {"w": jnp.array([below, t, above, 0.0], jnp.float32)}
  state = cl_optax.consolidate(tx.init(params), params, importance=imp)
  got, _ = tx.update({"w": jnp.ones(4)}, state, params)
  np.testing.assert_array_equal(got["w"], [1.0, 0.0, 0.0, 1.0])


def test_freeze_never_unfreezes(params):
  tx = cl_optax.freeze()
  ones = jax.tree.map(jnp.ones_like, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = cl_optax.consolidate(tx.init(params), params, importance=ones)
  state = cl_optax.consolidate(state, params, importance=zeros)
  assert all(bool(f.all()) for f in jax.tree.leaves(state.frozen))


def test_freeze_rejects_bad_importance(params):
  state = cl_optax.freeze().init(params)
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
  with pytest.raises(ValueError, match=r"freeze: `importance` leaf .* expected values in \[0, 1\]"):
    cl_optax.consolidate(state, params, importance=imp)
