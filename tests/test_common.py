"""The battery every cl_optax transform runs (after optax contrib's tests).

Add a transform by appending a `Case` to `CASES`: its factory, and the
signals `consolidate` needs for it (built from params).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import make_params

import cl_optax


class Case(NamedTuple):
  name: str
  make: Callable[[], optax.GradientTransformation]
  signals: Callable[[Any], dict]  # params -> consolidate signals
  inject: Callable[[], optax.GradientTransformation]  # inject_hyperparams form


def _half_importance(params):
  return {"importance": jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)}


def _rand_importance(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return {
    "importance": jax.tree.unflatten(
      tree, [jax.random.uniform(k, p.shape) for k, p in zip(keys, leaves)]
    )
  }


def _unit_shapes(params):
  """One importance per output unit (last axis) of every leaf (DAS-style state)."""
  return jax.tree.map(lambda p: p.shape[-1:], params)


def _unit_importance(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  return {
    "importance": jax.tree.unflatten(
      tree, [jax.random.uniform(k, p.shape[-1:]) for k, p in zip(keys, leaves)]
    )
  }


CASES = [
  Case(
    "soft_mask",
    cl_optax.soft_mask,
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.soft_mask)(),
  ),
  Case(
    "soft_mask_head",
    lambda: cl_optax.soft_mask(head=lambda p: {k: k == "head" for k in p}),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.soft_mask, static_args=("head",))(
      head=lambda p: {k: k == "head" for k in p}
    ),
  ),
  Case(
    "soft_mask_bf16",
    lambda: cl_optax.soft_mask(importance_dtype=jnp.bfloat16),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.soft_mask, static_args=("importance_dtype",))(
      importance_dtype=jnp.bfloat16
    ),
  ),
  Case(
    "soft_mask_units",
    lambda: cl_optax.soft_mask(importance_shapes=_unit_shapes),
    _unit_importance,
    lambda: optax.inject_hyperparams(cl_optax.soft_mask, static_args=("importance_shapes",))(
      importance_shapes=_unit_shapes
    ),
  ),
  Case(
    "freeze",
    cl_optax.freeze,
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.freeze)(threshold=0.5),
  ),
]
IDS = [c.name for c in CASES]


def _grads(params, seed=1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
  )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_accepts_unknown_extra_args(case):
  params = make_params()
  tx = case.make()
  state = tx.init(params)
  updates, _ = tx.update(
    _grads(params), state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1
  )
  chex.assert_trees_all_equal_shapes(updates, params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_preserves_dtype(case, dtype):
  params = make_params(dtype)
  tx = optax.chain(optax.sgd(0.1), case.make())
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  updates, _ = jax.jit(tx.update)(_grads(params), state, params)
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_stable_across_steps_and_consolidate(case):
  params = make_params()
  tx = optax.chain(optax.adam(0.1), case.make())
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, s1 = step(_grads(params), state, params)
  s2 = cl_optax.consolidate(s1, params, **case.signals(params))
  _, s3 = step(_grads(params, 2), s2, params)
  for a, b in [(state, s1), (s1, s2), (s2, s3)]:
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_retrace_after_consolidate(case):
  params = make_params()
  tx = optax.chain(optax.adam(0.1), case.make())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for task in range(3):
    for step in range(2):
      params, state = train_step(params, state, _grads(params, 10 * task + step))
    state = cl_optax.consolidate(state, params, **case.signals(params))
  chex.clear_trace_counter()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_works_under_multisteps(case):
  params = make_params()
  k = 3
  tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), case.make()), every_k_schedule=k)
  ref = optax.chain(optax.sgd(1.0), case.make())
  state, ref_state = tx.init(params), ref.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  ref_state = cl_optax.consolidate(ref_state, params, **case.signals(params))
  grads = [_grads(params, i) for i in range(k)]
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, params)
  mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
  expected, _ = ref.update(mean, ref_state, params)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_works_under_inject_hyperparams(case):
  params = make_params()
  tx, ref = case.inject(), case.make()
  state, ref_state = tx.init(params), ref.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  ref_state = cl_optax.consolidate(ref_state, params, **case.signals(params))
  g = _grads(params)
  got, _ = jax.jit(tx.update)(g, state, params)
  expected, _ = ref.update(g, ref_state, params)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)


class JitEqualityTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_same_with_and_without_jit(self):
    params = make_params()
    for case in CASES:
      tx = optax.chain(optax.adam(0.1), case.make())
      state = cl_optax.consolidate(tx.init(params), params, **case.signals(params))
      update = self.variant(tx.update)
      got, _ = update(_grads(params), state, params)
      expected, _ = jax.jit(tx.update)(_grads(params), state, params)
      chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_missing_signal_is_named(case):
  params = make_params()
  state = case.make().init(params)
  signal = next(iter(case.signals(params)))
  with pytest.raises(ValueError, match=f"needs the signal `{signal}=`"):
    cl_optax.consolidate(state, params)
