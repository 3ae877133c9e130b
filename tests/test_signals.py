"""Signals addressed to one transform, the debug switch, `selected`, and checks under jit."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

from conftest import normal_like, uniform_like


def _full(params, value):
  return jax.tree.map(lambda p: jnp.full(p.shape, value, jnp.float32), params)


def _moved(params):
  return jax.tree.map(lambda p, d: p + d, params, normal_like(params, 11))


# ------------------------------------------------------------ addressed signals


def test_ewc_adam_soft_mask_each_get_their_own_importance(params):
  """One consolidate gives EWC a Fisher and soft_mask an SPG importance; the
  update equals the three transforms run one after the other, each alone with
  its own signal."""
  fisher = jax.tree.map(lambda x: 5.0 * x, uniform_like(params, 3))  # > 1: not an SPG importance
  spg = uniform_like(params, 4)
  tx = optax.chain(cl_optax.ewc(2.0), optax.adam(0.1), cl_optax.soft_mask())
  state = cl_optax.consolidate(
    tx.init(params), params, importance=spg, to={"ewc": {"importance": fisher}}
  )
  chex.assert_trees_all_close(state[0].ewc_importance, fisher)
  chex.assert_trees_all_close(state[2].importance, spg)

  ewc, adam, mask = cl_optax.ewc(2.0), optax.adam(0.1), cl_optax.soft_mask()
  ewc_state = cl_optax.consolidate(ewc.init(params), params, importance=fisher)
  mask_state = cl_optax.consolidate(mask.init(params), params, importance=spg)
  g, at = normal_like(params, 5), _moved(params)
  u, _ = ewc.update(g, ewc_state, at)
  u, _ = adam.update(u, adam.init(params), at)
  want, _ = mask.update(u, mask_state, at)
  got, _ = jax.jit(tx.update)(g, state, at)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_addressed_signal_wins_over_broadcast_only_for_its_state(params):
  tx = optax.chain(cl_optax.soft_mask(), cl_optax.freeze(threshold=0.5))
  state = cl_optax.consolidate(
    tx.init(params),
    params,
    importance=_full(params, 0.25),
    to={"freeze": {"importance": _full(params, 0.75)}},
  )
  np.testing.assert_allclose(state[0].importance["scale"], 0.25)
  assert bool(state[1].frozen["scale"])


def test_two_soft_masks_under_named_chain(params):
  tx = optax.named_chain(
    ("left", cl_optax.soft_mask()), ("sgd", optax.sgd(1.0)), ("right", cl_optax.soft_mask())
  )
  to = {
    "left": {"importance": _full(params, 0.5)},
    "right/soft_mask": {"importance": _full(params, 0.75)},
  }
  state = cl_optax.consolidate(tx.init(params), params, to=to)
  np.testing.assert_allclose(state["left"].importance["scale"], 0.5)
  np.testing.assert_allclose(state["right"].importance["scale"], 0.75)
  updates, _ = tx.update(_full(params, 1.0), state, params)
  np.testing.assert_allclose(updates["scale"], -0.5 * 0.25)


def _two_masks_partition(params):
  labels = {k: "head" if k == "head" else "trunk" for k in params}
  return optax.partition({"trunk": cl_optax.soft_mask(), "head": cl_optax.soft_mask()}, labels)


def test_two_soft_masks_under_partition(params):
  tx = _two_masks_partition(params)
  to = {"trunk": {"importance": _full(params, 0.5)}, "head": {"importance": _full(params, 0.75)}}
  state = cl_optax.consolidate(tx.init(params), params, to=to)
  inner = {k: v.inner_state for k, v in state.inner_states.items()}
  np.testing.assert_allclose(inner["trunk"].importance["scale"], 0.5)
  np.testing.assert_allclose(inner["head"].importance["head"]["kernel"], 0.75)
  assert isinstance(inner["head"].importance["scale"], optax.MaskedNode)
  updates, _ = tx.update(_full(params, 1.0), state, params)
  np.testing.assert_allclose(updates["scale"], 0.5)
  np.testing.assert_allclose(updates["head"]["kernel"], 0.25)


_WRAPPERS = {
  "chain": lambda tx: optax.chain(optax.identity(), tx),
  "masked": lambda tx: optax.masked(tx, lambda p: jax.tree.map(lambda _: True, p)),
  "multisteps": lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
  "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
  "named_chain": lambda tx: optax.named_chain(("outer", tx)),
}


@pytest.mark.parametrize("wrap", _WRAPPERS.values(), ids=_WRAPPERS.keys())
def test_labels_are_found_through_every_combinator(params, wrap):
  tx = wrap(_two_masks_partition(params))
  to = {
    "trunk": {"importance": _full(params, 0.5)},
    "head/soft_mask": {"importance": _full(params, 0.75)},
  }
  state = cl_optax.consolidate(tx.init(params), params, to=to)
  got = {}
  is_mask = lambda x: isinstance(x, cl_optax.SoftMaskState)  # noqa: E731
  for path, x in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_mask):
    if is_mask(x):
      keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
      got[keys[-1]] = x.importance
  np.testing.assert_allclose(got["trunk"]["scale"], 0.5)
  np.testing.assert_allclose(got["head"]["head"]["kernel"], 0.75)


def test_transform_name_is_found_under_inject_hyperparams(params):
  tx = optax.chain(
    optax.inject_hyperparams(cl_optax.ewc)(2.0), optax.inject_hyperparams(cl_optax.soft_mask)()
  )
  state = cl_optax.consolidate(
    tx.init(params),
    params,
    importance=_full(params, 0.5),
    to={"ewc": {"importance": _full(params, 3.0)}},
  )
  np.testing.assert_allclose(optax.tree.get(state, "ewc_importance")["scale"], 3.0)
  np.testing.assert_allclose(optax.tree.get(state, "importance")["scale"], 0.5)


def test_unknown_address_lists_the_addresses_found(params):
  tx = optax.named_chain(("left", cl_optax.soft_mask()), ("right", cl_optax.ewc()))
  with pytest.raises(
    ValueError,
    match=r"the address 'middle' matches no state; the continual states found are at "
    r"\['left/soft_mask', 'right/ewc'\]",
  ):
    cl_optax.consolidate(tx.init(params), params, to={"middle": {"importance": _full(params, 0.5)}})


def test_ambiguous_address_lists_the_matches(params):
  tx = optax.chain(cl_optax.soft_mask(), optax.sgd(1.0), cl_optax.soft_mask())
  with pytest.raises(
    ValueError,
    match=r"the address 'soft_mask' is ambiguous for `importance=`: it matches "
    r"\['soft_mask', 'soft_mask'\].*optax.named_chain",
  ):
    cl_optax.consolidate(
      tx.init(params), params, to={"soft_mask": {"importance": _full(params, 0.5)}}
    )


def test_address_whose_states_do_not_read_the_signal(params):
  tx = optax.chain(cl_optax.agem(), cl_optax.soft_mask())
  with pytest.raises(
    ValueError, match=r"no state at 'agem' reads `importance=` \(agem reads no signal\)"
  ):
    cl_optax.consolidate(tx.init(params), params, to={"agem": {"importance": _full(params, 0.5)}})


def test_address_value_must_be_a_dict(params):
  state = cl_optax.soft_mask().init(params)
  with pytest.raises(ValueError, match=r"to\['soft_mask'\] must be a dict of signals"):
    cl_optax.consolidate(state, params, to={"soft_mask": jnp.ones(())})


def test_group_address_reaches_the_one_state_that_reads_the_signal(params):
  labels = {k: "head" if k == "head" else "trunk" for k in params}
  tx = optax.partition(
    {"trunk": optax.chain(cl_optax.agem(), cl_optax.soft_mask()), "head": cl_optax.soft_mask()},
    labels,
  )
  to = {"trunk": {"importance": _full(params, 0.5)}, "head": {"importance": _full(params, 0.25)}}
  state = cl_optax.consolidate(tx.init(params), params, to=to)
  np.testing.assert_allclose(state.inner_states["trunk"].inner_state[1].importance["scale"], 0.5)


# ------------------------------------------------------------------ Flax NNX
nnx = pytest.importorskip("flax.nnx")


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.trunk = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)


def _nnx_setup():
  model = _Model(nnx.Rngs(0))
  tx = optax.named_chain(("left", cl_optax.soft_mask()), ("right", cl_optax.soft_mask()))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  return optimizer, params, nnx.as_pure(params)


def test_nnx_optimizer_addressed_signals():
  optimizer, params, pure = _nnx_setup()
  to = {"left": {"importance": _full(pure, 0.5)}, "right": {"importance": _full(pure, 0.75)}}
  assert cl_optax.consolidate(optimizer, params, to=to) is optimizer.opt_state
  state = nnx.as_pure(optimizer.opt_state)
  chex.assert_trees_all_close(state["left"].importance, _full(pure, 0.5))
  chex.assert_trees_all_close(state["right"].importance, _full(pure, 0.75))


def test_nnx_optimizer_is_not_written_when_a_later_state_fails():
  optimizer, params, pure = _nnx_setup()
  before = jax.tree.map(np.asarray, nnx.as_pure(optimizer.opt_state))
  bad = {"right": {"importance": _full(pure, 1.5)}}  # left (visited first) is fine
  with pytest.raises(
    ValueError, match=r"soft_mask: `importance` leaf .* expected values in \[0, 1\]"
  ):
    cl_optax.consolidate(optimizer, params, importance=_full(pure, 0.5), to=bad)
  with pytest.raises(ValueError, match="matches no state"):
    cl_optax.consolidate(optimizer, params, importance=_full(pure, 0.5), to={"nowhere": {}})
  chex.assert_trees_all_equal(nnx.as_pure(optimizer.opt_state), before)


# ------------------------------------------------------------------ selected


def test_selected_shows_what_a_mask_picks(params):
  mask = lambda p: {k: k == "head" for k in p}  # noqa: E731
  assert cl_optax.selected(params, mask) == ["['head']['kernel']"]
  assert cl_optax.selected(params, jax.tree.map(lambda _: False, params)) == []


def test_selected_reveals_an_nnx_mask_that_picks_nothing():
  """Under NNX a mask function sees paths ending in `.value`: a mask on
  `endswith("['kernel']")` selects nothing; `selected` shows it, and shows the
  plain key strings of a mask that works."""
  _, params, _ = _nnx_setup()

  def by_path(test):
    return lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: test(jax.tree_util.keystr(path)), p
    )

  assert cl_optax.selected(params, by_path(lambda k: k.endswith("['kernel']"))) == []
  assert cl_optax.selected(params, by_path(lambda k: "['kernel']" in k)) == [
    "['head']['kernel']",
    "['trunk']['kernel']",
  ]


# ------------------------------------------------------------------ debug


@pytest.fixture
def debug_on():
  with cl_optax.debug():
    yield


def test_debug_is_off_by_default(params):
  tx = optax.masked(cl_optax.soft_mask(), jax.tree.map(lambda _: False, params))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = cl_optax.consolidate(tx.init(params), params, importance=_full(params, 0.5), foo=1)
    tx.update(params, state, params, ref_grad=1)


def test_debug_warns_about_a_signal_no_state_reads(params, debug_on):
  state = optax.chain(optax.adam(1e-3), cl_optax.soft_mask()).init(params)
  with pytest.warns(
    UserWarning,
    match=r"consolidate got `precision=`, which no state reads \(soft_mask reads `importance=`\)",
  ):
    cl_optax.consolidate(state, params, importance=_full(params, 0.5), precision=1.0)


def test_debug_warns_about_one_plain_signal_for_two_transforms(params, debug_on):
  """The issue's mistake: one `importance=` for EWC's Fisher and SPG's importance."""
  state = optax.chain(cl_optax.ewc(), optax.adam(1e-3), cl_optax.soft_mask()).init(params)
  with pytest.warns(
    UserWarning,
    match=r"the plain `importance=` reaches \['ewc', 'soft_mask'\], different transforms",
  ):
    cl_optax.consolidate(state, params, importance=_full(params, 0.5))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    to = {"ewc": {"importance": _full(params, 2.0)}}
    cl_optax.consolidate(state, params, importance=_full(params, 0.5), to=to)


def test_debug_warns_about_a_mask_that_selects_nothing(params, debug_on):
  tx = optax.chain(optax.masked(cl_optax.ewc(), jax.tree.map(lambda _: False, params)))
  with pytest.warns(UserWarning, match=r"the state at 'ewc' holds no parameter: its mask"):
    cl_optax.consolidate(tx.init(params), params, importance=_full(params, 0.5))


def test_debug_is_quiet_for_a_partial_mask(params, debug_on):
  tx = optax.masked(cl_optax.ewc(), lambda p: {k: k == "head" for k in p})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cl_optax.consolidate(tx.init(params), params, importance=_full(params, 0.5))


def test_debug_warns_about_an_extra_arg_no_transform_reads(params, debug_on):
  tx = optax.chain(optax.sgd(1.0), cl_optax.agem())
  state = tx.init(params)
  with pytest.warns(
    UserWarning, match=r"extra argument\(s\) \['ref_grad'\] .* read by no cl_optax"
  ):
    jax.jit(lambda g, s, p: tx.update(g, s, p, ref_grad=g))(params, state, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(params, state, params, ref_grads=params)


def test_unread_extra_args_checks_one_chain(params):
  state = optax.chain(optax.adam(1e-3), cl_optax.soft_mask()).init(params)
  assert cl_optax.unread_extra_args(state, ref_grads=params, value=1.0) == ["ref_grads", "value"]
  state = optax.chain(cl_optax.agem(), cl_optax.gem(max_tasks=2)).init(params)
  assert cl_optax.unread_extra_args(state, ref_grads=params, task_grads=params) == []


def test_set_debug_returns_the_previous_setting():
  assert cl_optax.set_debug(True) is False
  assert cl_optax.set_debug(False) is True
  with cl_optax.debug():
    assert cl_optax.set_debug(True) is True
  assert cl_optax.set_debug(False) is False


# ------------------------------------------------------------------ jit


@pytest.mark.parametrize(
  "make, bad, pattern",
  [
    (cl_optax.soft_mask, 3.0, r"soft_mask: `importance` leaf \['scale'\] has values in \[3, 3\]"),
    (cl_optax.soft_mask, np.nan, r"soft_mask: `importance` leaf \['scale'\] holds non-finite"),
    (cl_optax.ewc, -1.0, r"ewc: `importance` leaf \['scale'\] has a negative value -1"),
    (cl_optax.ewc, np.nan, r"ewc: `importance` leaf \['scale'\] holds non-finite"),
  ],
  ids=["unit_3", "unit_nan", "ewc_negative", "ewc_nan"],
)
def test_jitted_consolidate_raises_on_a_bad_value(params, make, bad, pattern):
  state = make().init(params)
  imp = dict(_full(params, 0.5))
  imp["scale"] = jnp.asarray(bad, jnp.float32)
  jitted = jax.jit(lambda s, p, i: cl_optax.consolidate(s, p, importance=i))
  with pytest.raises(jax.errors.JaxRuntimeError, match=pattern):
    jax.block_until_ready(jitted(state, params, imp))
  # the same message eagerly, as a ValueError
  with pytest.raises(ValueError, match=pattern):
    cl_optax.consolidate(state, params, importance=imp)


def test_jitted_consolidate_stores_a_good_value(params):
  state = cl_optax.soft_mask().init(params)
  jitted = jax.jit(lambda s, p, i: cl_optax.consolidate(s, p, importance=i))
  got = jitted(state, params, _full(params, 0.5))
  chex.assert_trees_all_close(got.importance, _full(params, 0.5))


def test_jitted_ogd_consolidate_raises_on_non_finite_output_grads(params):
  state = cl_optax.ogd(4).init(params)
  grads = normal_like(params, 3, stack=(2,))
  grads["scale"] = jnp.full((2,), np.nan)
  jitted = jax.jit(lambda s, p, o: cl_optax.consolidate(s, p, output_grads=o))
  pattern = (
    r"ogd: `output_grads` leaf \['scale'\] holds non-finite values; expected finite values\."
  )
  with pytest.raises(jax.errors.JaxRuntimeError, match=pattern):
    jax.block_until_ready(jitted(state, params, grads))


def test_missing_signal_names_the_state_address_among_several(params):
  tx = _two_masks_partition(params)
  with pytest.raises(
    ValueError,
    match=r"needs the signal `importance=`.* \(the state at 'head/soft_mask'\)",
  ):
    cl_optax.consolidate(tx.init(params), params, to={"trunk": {"importance": _full(params, 0.5)}})
