"""Boundary writes (`boundary_writes`, `apply_pending_writes`) and per-step unit resets
(`unit_resets`, `redo_selector`) against plain numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from subprocess_env import ROOT, run_script

import cl_optax

from conftest import normal_like, normal_tree

PARAMS = normal_tree(0, {"a": (4, 3), "b": (3,), "c": ()})
MASK = {
  "a": np.arange(12).reshape(4, 3) % 3 == 0,
  "b": np.array([False, True, False]),
  "c": np.array(False),
}
GRADS = normal_like(PARAMS, 1)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _step(tx, state, grads, params, **extra):
  updates, state = tx.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def _equal(a, b, **tol):
  del tol
  np.testing.assert_array_equal(a, b)


def _pending(state):
  flag = optax.tree.get(state, "write_pending")
  return bool(flag.get_value() if hasattr(flag, "get_value") else flag)  # NNX: a Variable


# ---------------------------------------------------------------- boundary writes


class BoundaryWritesTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_write_is_exact_and_the_rest_is_adam(self):
    tx = optax.chain(optax.adam(0.1), cl_optax.boundary_writes())
    ref = optax.adam(0.1)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=0.0, write_mask=MASK)
    assert _pending(state)
    step = self.variant(lambda g, s, p: _step(tx, s, g, p))
    ref_step = self.variant(lambda g, s, p: _step(ref, s, g, p))  # same fusion as `step`
    new, state = step(GRADS, state, PARAMS)
    ref_new, ref_state = ref_step(GRADS, ref.init(PARAMS), PARAMS)
    for k in PARAMS:
      got, want, m = np.asarray(new[k]), np.asarray(ref_new[k]), MASK[k]
      np.testing.assert_array_equal(got[m], 0.0)  # exactly 0.0: p + (0 - p)
      np.testing.assert_array_equal(got[~m], want[~m])  # exactly Adam's step
    # the write cleared: the next step is Adam's (the moments saw the same gradient)
    assert not _pending(state)
    chex.assert_trees_all_equal(
      optax.tree.get(state, "write_mask"), jax.tree.map(np.zeros_like, MASK)
    )
    new2, _ = step(GRADS, state, new)
    ref_new2, _ = ref_step(GRADS, ref_state, new)
    chex.assert_trees_all_equal(new2, ref_new2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nonzero_write_lands_on_target(self):
    tx = optax.chain(optax.adam(0.1), cl_optax.boundary_writes())
    target = normal_like(PARAMS, 5)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=target, write_mask=MASK)
    new, _ = self.variant(lambda g, s, p: _step(tx, s, g, p))(GRADS, state, PARAMS)
    for k in PARAMS:
      m = MASK[k]
      # p + fl(t - p) rounds twice: t up to an ulp of |t - p|, not bitwise.
      np.testing.assert_allclose(np.asarray(new[k])[m], np.asarray(target[k])[m], rtol=1e-6)

  def test_write_lands_at_the_real_multisteps_step(self):
    k = 3
    tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), cl_optax.boundary_writes()), k)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=0.0, write_mask=MASK)
    step = jax.jit(lambda g, s, p: _step(tx, s, g, p))
    params = PARAMS
    for i in range(k - 1):
      params, state = step(normal_like(PARAMS, i), state, params)
      chex.assert_trees_all_equal(params, PARAMS)  # a mini-step does not move
      assert _pending(state)
    params, state = step(normal_like(PARAMS, k), state, params)
    assert not _pending(state)
    mean = jax.tree.map(lambda *g: sum(g) / k, *[normal_like(PARAMS, i) for i in [0, 1, k]])
    for key in PARAMS:
      got, m = np.asarray(params[key]), MASK[key]
      np.testing.assert_array_equal(got[m], 0.0)
      want = np.asarray(PARAMS[key]) - 0.1 * np.asarray(mean[key])
      np.testing.assert_allclose(got[~m], want[~m], rtol=1e-6)

  def test_apply_if_finite_keeps_the_write_over_a_skipped_step(self):
    tx = optax.apply_if_finite(optax.chain(optax.sgd(0.1), cl_optax.boundary_writes()), 5)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=0.0, write_mask=MASK)
    step = jax.jit(lambda g, s, p: _step(tx, s, g, p))
    nan = jax.tree.map(
      lambda g: g.at[()].set(jnp.nan) if g.ndim == 0 else g.at[0].set(jnp.nan), GRADS
    )
    params, state = step(nan, state, PARAMS)
    chex.assert_trees_all_equal(params, PARAMS)
    assert _pending(state)
    params, state = step(GRADS, state, params)
    assert not _pending(state)
    for key in PARAMS:
      got, m = np.asarray(params[key]), MASK[key]
      np.testing.assert_array_equal(got[m], 0.0)
      want = np.asarray(PARAMS[key]) - 0.1 * np.asarray(GRADS[key])
      np.testing.assert_allclose(got[~m], want[~m], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_at_once_is_the_next_step_and_clears(self):
    tx = optax.chain(optax.adam(0.1), cl_optax.boundary_writes())
    target = normal_like(PARAMS, 5)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=target, write_mask=MASK)
    now, now_state = self.variant(cl_optax.apply_pending_writes)(PARAMS, state)
    stepped, _ = jax.jit(lambda g, s, p: _step(tx, s, g, p))(GRADS, state, PARAMS)
    for k in PARAMS:
      m = MASK[k]
      np.testing.assert_array_equal(np.asarray(now[k])[m], np.asarray(stepped[k])[m])
      np.testing.assert_array_equal(np.asarray(now[k])[~m], np.asarray(PARAMS[k])[~m])
    assert not _pending(now_state)
    # the next step is an ordinary one (Adam's, from the applied params)
    ref = optax.adam(0.1)
    got, _ = _step(tx, now_state, GRADS, now)
    want, _ = _step(ref, ref.init(PARAMS), GRADS, now)
    chex.assert_trees_all_equal(got, want)


def test_apply_pending_writes_through_nesting():
  mask_fn = {"a": True, "b": True, "c": False}
  tx = optax.inject_hyperparams(optax.sgd)(0.1)
  tx = optax.chain(tx, optax.masked(cl_optax.boundary_writes(), mask_fn))
  tx = optax.MultiSteps(tx, 2)
  state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=0.0, write_mask=MASK)
  now, state = jax.jit(cl_optax.apply_pending_writes)(PARAMS, state)
  np.testing.assert_array_equal(np.asarray(now["a"])[MASK["a"]], 0.0)
  np.testing.assert_array_equal(np.asarray(now["b"])[MASK["b"]], 0.0)
  chex.assert_trees_all_equal(now["c"], PARAMS["c"])
  assert not _pending(state)


def test_two_boundaries_merge_the_later_wins():
  tx = cl_optax.boundary_writes()
  state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=1.0, write_mask=MASK)
  second = {"a": MASK["a"] | (np.arange(12).reshape(4, 3) % 3 == 1), "b": False, "c": True}
  state = cl_optax.consolidate(state, PARAMS, writes=2.0, write_mask=second)
  now, _ = cl_optax.apply_pending_writes(PARAMS, state)
  for k in PARAMS:
    m1, m2 = np.broadcast_to(MASK[k], PARAMS[k].shape), np.broadcast_to(second[k], PARAMS[k].shape)
    want = np.where(m2, 2.0, np.where(m1, 1.0, np.asarray(PARAMS[k])))
    np.testing.assert_allclose(np.asarray(now[k]), want, rtol=1e-6)


def test_writes_none_schedules_nothing():
  tx = optax.chain(cl_optax.soft_mask(), cl_optax.boundary_writes())
  state = tx.init(PARAMS)
  imp = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), PARAMS)
  new = cl_optax.consolidate(state, PARAMS, importance=imp, writes=None)
  chex.assert_trees_all_equal(optax.tree.get(new, "pending"), optax.tree.get(state, "pending"))


@pytest.mark.parametrize(
  "signals, match",
  [
    ({}, r"needs the signal `writes=`"),
    ({"writes": {"a": 0.0, "b": 0.0}}, r"boundary_writes: `writes` does not match"),
    ({"writes": {"a": jnp.zeros((3, 4)), "b": 0.0, "c": 0.0}}, r"`writes` leaf \['a'\] has shape"),
    (
      {"writes": 0.0, "write_mask": {"a": 1.0, "b": True, "c": True}},
      r"`write_mask` leaf \['a'\].*bool",
    ),
    ({"writes": {"a": 0.0, "b": jnp.nan, "c": 0.0}}, r"`writes` leaf \['b'\] holds non-finite"),
    (
      {"writes": 0.0, "write_mask": {"a": MASK["a"][:2], "b": True, "c": True}},
      r"`write_mask` leaf",
    ),
  ],
)
def test_bad_signal_raises_and_leaves_state_unchanged(signals, match):
  tx = cl_optax.boundary_writes()
  state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, writes=0.0, write_mask=MASK)
  before = jax.tree.map(np.array, state)
  with pytest.raises(ValueError, match=match):
    cl_optax.consolidate(state, PARAMS, **signals)
  chex.assert_trees_all_equal(state, before)


def test_check_writes_last():
  cl_optax.check_writes_last(optax.chain(optax.adam(0.1), cl_optax.boundary_writes()), PARAMS)
  labels = {"a": True, "b": False, "c": True}
  cl_optax.check_writes_last(
    optax.chain(optax.sgd(0.1), optax.masked(cl_optax.boundary_writes(), labels)), PARAMS
  )
  with pytest.raises(
    ValueError, match=r"\['a'\] \(updates = -0.1 x the write\).*last in the chain"
  ):
    cl_optax.check_writes_last(optax.chain(cl_optax.boundary_writes(), optax.sgd(0.1)), PARAMS)
  with pytest.raises(ValueError, match="changes it"):
    cl_optax.check_writes_last(optax.chain(cl_optax.boundary_writes(), optax.adam(0.1)), PARAMS)
  with pytest.raises(ValueError, match="no boundary-write state"):
    cl_optax.check_writes_last(optax.adam(0.1), PARAMS)


def test_update_without_params_raises():
  tx = cl_optax.boundary_writes()
  with pytest.raises(ValueError, match="boundary_writes: update needs `params`"):
    tx.update(GRADS, tx.init(PARAMS))


# ---------------------------------------------------------------- unit resets

MLP = normal_tree(
  3, {"l1": {"kernel": (4, 5), "bias": (5,)}, "l2": {"kernel": (5, 3), "bias": (3,)}}
)
LAYERS = [("l1/kernel", "l1/bias", "l2/kernel")]
INIT = jax.nn.initializers.lecun_normal()
MLP_GRADS = normal_like(MLP, 4)


def _acts(dead, seed=6, n=5):
  h = np.abs(np.asarray(jax.random.normal(jax.random.key(seed), (8, n)))) + 0.1
  h[:, list(dead)] = 0.0
  return [jnp.asarray(h)]


def _draw(seed, shape, index=0, n_layers=1, steps=1):
  key = jax.random.PRNGKey(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
  return np.asarray(INIT(jax.random.split(sub, n_layers)[index], shape, jnp.float32))


def _reset_tx(max_units, threshold=0.0, every=1, seed=0):
  return cl_optax.unit_resets(
    optax.adam(0.1),
    layers=LAYERS,
    select=cl_optax.redo_selector(threshold, every=every),
    reinit=INIT,
    max_units=max_units,
    seed=seed,
  )


def _np_redo(h, threshold, k):
  """ReDo's score and the (at most) k lowest dormant units, ties by index (numpy)."""
  a = np.abs(np.asarray(h)).reshape(-1, h.shape[-1]).mean(0)
  s = a / (a.mean() + 1e-9)
  cand = np.flatnonzero(s <= threshold)
  return np.sort(cand[np.argsort(s[cand], kind="stable")[:k]])


class UnitResetsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_reset_against_numpy(self):
    tx, ref = _reset_tx(max_units=2, seed=3), optax.adam(0.1)
    acts = _acts(dead=(1, 3, 4))
    units = _np_redo(acts[0], 0.0, 2)
    np.testing.assert_array_equal(units, [1, 3])  # three dead, k_max = 2, ties by index
    step = self.variant(lambda g, s, p, h: _step(tx, s, g, p, activations=h))
    new, state = step(MLP_GRADS, tx.init(MLP), MLP, acts)
    ref_step = self.variant(lambda g, s, p: _step(ref, s, g, p))  # same fusion as `step`
    ref_new, ref_state = ref_step(MLP_GRADS, ref.init(MLP), MLP)
    new, ref_new = _np(new), _np(ref_new)
    keep = np.setdiff1d(np.arange(5), units)
    draw = _draw(3, (4, 5))
    np.testing.assert_allclose(new["l1"]["kernel"][:, units], draw[:, units], rtol=1e-6, atol=1e-7)
    # Adam's step elsewhere (bitwise without jit; XLA fuses the step inside the reset's cond
    # differently from Adam alone, so allow an ulp under jit)
    same = (
      np.testing.assert_allclose if self.variant.type == chex.ChexVariantType.WITH_JIT else _equal
    )
    same(new["l1"]["kernel"][:, keep], ref_new["l1"]["kernel"][:, keep], rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(new["l1"]["bias"][units], 0.0)
    same(new["l1"]["bias"][keep], ref_new["l1"]["bias"][keep], rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(new["l2"]["kernel"][units], 0.0)
    same(new["l2"]["kernel"][keep], ref_new["l2"]["kernel"][keep], rtol=1e-6, atol=1e-8)
    same(new["l2"]["bias"], ref_new["l2"]["bias"], rtol=1e-6, atol=1e-8)
    # inner Adam: mu and nu zero exactly at the reset entries, Adam's elsewhere; count kept
    where = {
      "l1": {"kernel": np.isin(np.arange(5), units)[None, :], "bias": np.isin(np.arange(5), units)},
      "l2": {"kernel": np.isin(np.arange(5), units)[:, None], "bias": np.zeros(3, bool)},
    }
    for name in ("mu", "nu"):
      got, want = _np(optax.tree.get(state, name)), _np(optax.tree.get(ref_state, name))
      for g, w, m in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(where)):
        m = np.broadcast_to(m, g.shape)
        np.testing.assert_array_equal(g[m], 0.0)
        np.testing.assert_array_equal(g[~m], w[~m])
    assert int(optax.tree.get(state, "count")) == int(optax.tree.get(ref_state, "count")) == 1
    np.testing.assert_array_equal(state.reset_units[0], np.isin(np.arange(5), units))
    assert int(state.reset_count) == 1

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_selection_is_the_inner_transform_exactly(self):
    tx, ref = _reset_tx(max_units=2), optax.adam(0.1)
    step = self.variant(lambda g, s, p, h: tx.update(g, s, p, activations=h))
    got, state = step(MLP_GRADS, tx.init(MLP), MLP, _acts(dead=()))
    want, ref_state = self.variant(ref.update)(MLP_GRADS, ref.init(MLP), MLP)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(state.reset_inner_state, ref_state)
    assert not np.any(state.reset_units[0])

  def test_k_max_and_lowest_scores_first(self):
    h = np.abs(np.asarray(jax.random.normal(jax.random.key(2), (8, 5)))) + 0.5
    h[:, 2] *= 0.01
    h[:, 0] *= 0.02
    h[:, 4] *= 0.03
    for k in (1, 2, 5):
      tx = _reset_tx(max_units=k, threshold=0.5)
      _, state = tx.update(MLP_GRADS, tx.init(MLP), MLP, activations=[jnp.asarray(h)])
      want = _np_redo(h, 0.5, k)
      np.testing.assert_array_equal(np.flatnonzero(state.reset_units[0]), want)
      assert len(want) == min(k, 3)

  def test_every_f_steps(self):
    tx = _reset_tx(max_units=1, every=2)
    step = jax.jit(lambda g, s, p, h: _step(tx, s, g, p, activations=h))
    state, params, acts = tx.init(MLP), MLP, _acts(dead=(2,))
    resets = []
    for _ in range(4):
      params, state = step(MLP_GRADS, state, params, acts)
      resets.append(bool(state.reset_units[0][2]))
    assert resets == [False, True, False, True]
    # the second reset draws with the key of step 4
    np.testing.assert_allclose(
      np.asarray(params["l1"]["kernel"][:, 2]), _draw(0, (4, 5), steps=4)[:, 2], atol=1e-6
    )

  def test_no_retrace_across_steps(self):
    tx = _reset_tx(max_units=2, threshold=0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads, acts):
      return _step(tx, state, grads, params, activations=acts)

    state, params = tx.init(MLP), MLP
    for i, dead in enumerate([(), (1,), (0, 2, 4), ()]):
      params, state = step(params, state, normal_like(MLP, i), _acts(dead, seed=i))
    chex.clear_trace_counter()
    assert int(state.reset_count) == 4
    chex.assert_tree_all_finite(params)

  def test_shared_kernel_gets_the_later_layers_draw(self):
    params = normal_tree(
      9, {"l1": {"kernel": (4, 3)}, "l2": {"kernel": (3, 3)}, "l3": {"kernel": (3, 2)}}
    )
    layers = [("l1/kernel", None, "l2/kernel"), ("l2/kernel", None, "l3/kernel")]
    tx = cl_optax.unit_resets(optax.sgd(0.1), layers=layers, reinit=INIT, max_units=1)
    dead = [jnp.asarray([[1.0, 0.0, 1.0]]), jnp.asarray([[0.0, 1.0, 1.0]])]
    grads = jax.tree.map(jnp.zeros_like, params)
    new, _ = _step(tx, tx.init(params), grads, params, activations=dead)
    draw2 = _draw(0, (3, 3), index=1, n_layers=2)
    k2 = np.asarray(new["l2"]["kernel"])
    np.testing.assert_allclose(k2[1, 0], draw2[1, 0], rtol=1e-6)  # both: the later draw
    np.testing.assert_array_equal(k2[1, 1:], 0.0)  # out row of l1's unit 1
    np.testing.assert_allclose(k2[[0, 2], 0], draw2[[0, 2], 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["l3"]["kernel"])[0], 0.0)

  def test_bad_layers_and_activations(self):
    with pytest.raises(ValueError, match=r"unit_resets: layers\[0\] kernel_in path 'l9/kernel'"):
      cl_optax.unit_resets(optax.sgd(0.1), layers=[("l9/kernel", None, "l2/kernel")]).init(MLP)
    with pytest.raises(ValueError, match=r"layers\[0\] kernel_out 'l2/bias'"):
      cl_optax.unit_resets(optax.sgd(0.1), layers=[("l1/kernel", None, "l2/bias")]).init(MLP)
    tx = _reset_tx(max_units=1)
    with pytest.raises(ValueError, match=r"`activations`\[0\] has shape \(8, 4\)"):
      tx.update(MLP_GRADS, tx.init(MLP), MLP, activations=[jnp.ones((8, 4))])
    with pytest.raises(ValueError, match="sequence of 1 arrays"):
      tx.update(MLP_GRADS, tx.init(MLP), MLP, activations=[jnp.ones((8, 5))] * 2)


class ResetsThroughNestingTest(parameterized.TestCase):
  def test_consolidate_reaches_the_inner_state(self):
    tx = cl_optax.unit_resets(
      optax.chain(optax.adam(0.1), cl_optax.boundary_writes()), layers=LAYERS, max_units=1
    )
    state = cl_optax.consolidate(tx.init(MLP), MLP, writes=0.0, write_mask=True)
    new, state = _step(tx, state, MLP_GRADS, MLP, activations=_acts(dead=()))
    chex.assert_trees_all_equal(new, jax.tree.map(jnp.zeros_like, MLP))


@pytest.mark.slow  # 8 host devices, in a subprocess
def test_writes_and_resets_shard_like_params():
  proc = run_script(ROOT / "tests" / "multidevice" / "check_writes_sharding.py", timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "boundary_writes: ok" in proc.stdout and "unit_resets: ok" in proc.stdout, proc.stdout


def test_moment_reset_inside_masked_inner():
  """An inner `optax.masked` with a mask tree (its init cannot run on optax's placeholder)."""
  mask = {"l1": {"kernel": True, "bias": True}, "l2": {"kernel": True, "bias": False}}
  inner = optax.chain(optax.masked(optax.adam(0.1), mask), optax.masked(optax.sgd(0.1), _not(mask)))
  tx = cl_optax.unit_resets(inner, layers=LAYERS, reinit=INIT, max_units=1)
  _, state = tx.update(MLP_GRADS, tx.init(MLP), MLP, activations=_acts(dead=(2,)))
  mu = optax.tree.get(state, "mu")
  ref = optax.adam(0.1)
  _, ref_state = ref.update(MLP_GRADS, ref.init(MLP), MLP)
  want = optax.tree.get(ref_state, "mu")
  got_k, want_k = np.asarray(mu["l1"]["kernel"]), np.asarray(want["l1"]["kernel"])
  np.testing.assert_array_equal(got_k[:, 2], 0.0)
  np.testing.assert_array_equal(np.delete(got_k, 2, axis=1), np.delete(want_k, 2, axis=1))
  np.testing.assert_array_equal(np.asarray(mu["l2"]["kernel"])[2], 0.0)
  assert isinstance(mu["l2"]["bias"], optax.MaskedNode)


def _not(mask):
  return jax.tree.map(lambda m: not m, mask)


nnx = pytest.importorskip("flax.nnx")


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.trunk = nnx.Linear(4, 5, rngs=rngs)
    self.head = nnx.Linear(5, 2, rngs=rngs)


def test_nnx_optimizer_writes_and_apply_at_once():
  model = _MLP(nnx.Rngs(0))
  tx = optax.chain(optax.adam(0.1), cl_optax.boundary_writes())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  pruned = jax.tree.map(lambda p: jnp.abs(p) < 0.3, nnx.as_pure(params))
  cl_optax.consolidate(optimizer, params, writes=0.0, write_mask=pruned)
  new, out = cl_optax.apply_pending_writes(params, optimizer)
  assert out is optimizer.opt_state and not _pending(optimizer.opt_state)
  nnx.update(model, new)
  for p, m in zip(
    jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param))), jax.tree.leaves(pruned)
  ):
    np.testing.assert_array_equal(np.asarray(p)[np.asarray(m)], 0.0)

  # the same write through a step of nnx.Optimizer
  model2 = _MLP(nnx.Rngs(0))
  optimizer2 = nnx.Optimizer(model2, tx, wrt=nnx.Param)
  cl_optax.consolidate(optimizer2, nnx.state(model2, nnx.Param), writes=0.0, write_mask=pruned)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model2, nnx.Param))
  nnx.jit(lambda m, o, g: o.update(m, g))(model2, optimizer2, grads)
  for p, m in zip(
    jax.tree.leaves(nnx.as_pure(nnx.state(model2, nnx.Param))), jax.tree.leaves(pruned)
  ):
    np.testing.assert_array_equal(np.asarray(p)[np.asarray(m)], 0.0)
  assert not _pending(optimizer2.opt_state)


def test_nnx_optimizer_unit_resets():
  model = _MLP(nnx.Rngs(0))
  tx = cl_optax.unit_resets(
    optax.adam(0.1), layers=[("trunk/kernel", "trunk/bias", "head/kernel")], max_units=1
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  h = jnp.ones((3, 5)).at[:, 4].set(0.0)
  nnx.jit(lambda m, o, g, h: o.update(m, g, activations=[h]))(model, optimizer, grads, h)
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...])[4], 0.0)
  assert float(model.trunk.bias[...][4]) == 0.0
