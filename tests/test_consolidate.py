"""`cl_optax.consolidate` finds continual states wherever optax nests them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax


def _importance(params, value=0.75):
  return jax.tree.map(lambda p: jnp.full(p.shape, value, jnp.float32), params)


def _ones(params):
  return jax.tree.map(jnp.ones_like, params)


def _check_masked_sgd_step(tx, params, expected_scale):
  """After consolidating importance .75, an sgd(1) step on ones is -scale."""
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, importance=_importance(params))
  updates, _ = jax.jit(tx.update)(_ones(params), state, params)
  expected = jax.tree.map(lambda p, s: -s * jnp.ones_like(p), params, expected_scale)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)
  return state


def _scales(params, **by_key):
  return {k: jax.tree.map(lambda _: by_key.get(k, 0.25), v) for k, v in params.items()}


def test_chain(params):
  tx = optax.chain(optax.sgd(1.0), cl_optax.soft_mask())
  _check_masked_sgd_step(tx, params, _scales(params))


def test_nested_chain(params):
  tx = optax.chain(optax.chain(optax.identity(), optax.chain(cl_optax.soft_mask())), optax.sgd(1.0))
  _check_masked_sgd_step(tx, params, _scales(params))


def test_named_chain(params):
  tx = optax.named_chain(("mask", cl_optax.soft_mask()), ("sgd", optax.sgd(1.0)))
  state = _check_masked_sgd_step(tx, params, _scales(params))
  np.testing.assert_allclose(state["mask"].importance["scale"], 0.75)


def test_masked(params):
  mask = {k: k != "head" for k in params}
  tx = optax.chain(optax.masked(cl_optax.soft_mask(), mask), optax.sgd(1.0))
  _check_masked_sgd_step(tx, params, _scales(params, head=1.0))


def test_partition(params):
  labels = {k: "head" if k == "head" else "trunk" for k in params}
  tx = optax.chain(
    optax.partition({"trunk": cl_optax.soft_mask(), "head": optax.identity()}, labels),
    optax.sgd(1.0),
  )
  _check_masked_sgd_step(tx, params, _scales(params, head=1.0))


@pytest.mark.skipif(not hasattr(optax, "multi_transform"), reason="removed from optax")
def test_multi_transform(params):
  labels = {k: "head" if k == "head" else "trunk" for k in params}
  tx = optax.chain(
    optax.multi_transform({"trunk": cl_optax.soft_mask(), "head": optax.identity()}, labels),
    optax.sgd(1.0),
  )
  _check_masked_sgd_step(tx, params, _scales(params, head=1.0))


def test_inject_hyperparams(params):
  tx = optax.chain(
    optax.inject_hyperparams(cl_optax.soft_mask)(),
    optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
  )
  _check_masked_sgd_step(tx, params, _scales(params))


def test_multisteps(params):
  tx = optax.MultiSteps(optax.chain(cl_optax.soft_mask(), optax.sgd(1.0)), 1)
  _check_masked_sgd_step(tx, params, _scales(params))


def test_head_labels_scale_by_mean_trunk_importance(params):
  tx = optax.chain(cl_optax.soft_mask(head={k: k == "head" for k in params}), optax.sgd(1.0))
  # Head importance is not kept: only the trunk's mean (.75) counts.
  _check_masked_sgd_step(tx, params, _scales(params))
  state = tx.init(params)
  assert isinstance(optax.tree.get(state, "importance")["head"], optax.MaskedNode)


def test_tree_get_finds_importance(params):
  tx = optax.chain(optax.adam(1e-3), cl_optax.soft_mask())
  state = cl_optax.consolidate(tx.init(params), params, importance=_importance(params))
  chex.assert_trees_all_close(optax.tree.get(state, "importance"), _importance(params))
  state = optax.tree.set(state, importance=_importance(params, 0.0))
  chex.assert_trees_all_close(optax.tree.get(state, "importance"), _importance(params, 0.0))


def test_all_continual_states_in_a_tree_are_consolidated(params):
  tx = optax.chain(cl_optax.soft_mask(), cl_optax.freeze(), optax.sgd(1.0))
  state = cl_optax.consolidate(tx.init(params), params, importance=_importance(params))
  assert bool(jax.tree.leaves(state[1].frozen)[0].all())
  np.testing.assert_allclose(state[0].importance["scale"], 0.75)


def test_no_continual_state_is_an_error(params):
  with pytest.raises(ValueError, match="no continual-learning state"):
    cl_optax.consolidate(optax.adam(1e-3).init(params), params, importance=1)


def test_missing_signal_names_transform_and_signal(params):
  state = optax.chain(optax.adam(1e-3), cl_optax.soft_mask()).init(params)
  with pytest.raises(
    ValueError,
    match=r"soft_mask: consolidate needs the signal "
    r"`importance=`.*got signals \['precision'\]",
  ):
    cl_optax.consolidate(state, params, precision=1.0)


def test_mismatched_importance_tree_is_named(params):
  state = cl_optax.soft_mask().init(params)
  bad = dict(_importance(params))
  del bad["scale"]
  with pytest.raises(ValueError, match="soft_mask: `importance` does not match"):
    cl_optax.consolidate(state, params, importance=bad)


@pytest.mark.parametrize(
  "bad, pattern",
  [
    (1.5, r"\['scale'\] has values in \[1.5, 1.5\]; expected values in \[0, 1\]"),
    (-0.1, r"values in \[-0.1, -0.1\]"),
    (np.nan, r"\['scale'\] holds non-finite values"),
  ],
)
def test_importance_outside_unit_interval_is_named(params, bad, pattern):
  state = cl_optax.soft_mask().init(params)
  imp = dict(_importance(params))
  imp["scale"] = jnp.asarray(bad, jnp.float32)
  with pytest.raises(ValueError, match=pattern):
    cl_optax.consolidate(state, params, importance=imp)


def test_wrong_leaf_shape_is_named(params):
  state = cl_optax.soft_mask().init(params)
  imp = dict(_importance(params))
  imp["scale"] = jnp.zeros((2,))
  with pytest.raises(ValueError, match=r"\['scale'\] has shape \(2,\); expected \(\)"):
    cl_optax.consolidate(state, params, importance=imp)


def test_consolidate_inside_jit(params):
  tx = optax.chain(cl_optax.soft_mask(), optax.sgd(1.0))
  state = tx.init(params)
  got = jax.jit(lambda s, p, i: cl_optax.consolidate(s, p, importance=i))(
    state, params, _importance(params)
  )
  want = cl_optax.consolidate(state, params, importance=_importance(params))
  chex.assert_trees_all_close(got, want)


# ------------------------------------------------------------------ Flax NNX
nnx = pytest.importorskip("flax.nnx")


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.trunk = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.trunk(x)))


def test_nnx_optimizer_state_is_consolidated_in_place():
  model = _Model(nnx.Rngs(0))
  tx = optax.chain(optax.sgd(1.0), cl_optax.soft_mask())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 0.75), nnx.as_pure(params))
  out = cl_optax.consolidate(optimizer.opt_state, params, importance=imp)
  assert out is optimizer.opt_state
  got = nnx.as_pure(optax.tree.get(optimizer.opt_state, "importance"))
  chex.assert_trees_all_close(got, imp)

  # A step through nnx.Optimizer now moves every weight by 1/4 of sgd's step.
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer, grads):
    optimizer.update(model, grads)

  step(model, optimizer, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(
    jax.tree.map(lambda a, b: a - b, after, before),
    jax.tree.map(lambda p: jnp.full(p.shape, -0.25), before),
    rtol=1e-6,
  )


def test_nnx_optimizer_itself_can_be_passed():
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, cl_optax.soft_mask(), wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), nnx.as_pure(params))
  cl_optax.consolidate(optimizer, params, importance=imp)
  chex.assert_trees_all_close(nnx.as_pure(optax.tree.get(optimizer.opt_state, "importance")), imp)
