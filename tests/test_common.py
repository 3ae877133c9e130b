"""The battery every cl_optax transform runs (after optax contrib's tests).

Add a transform by appending a `Case` to `CASES`: its factory, and the
signals `consolidate` needs for it (built from params).

The properties that compile each case inside another wrapper (`optax.MultiSteps`,
`optax.inject_hyperparams`, a donating step, jit against `jax.disable_jit`) are marked
`slow`: `make test` runs them, `make test-fast` leaves them out. While working on one
transform, run the whole battery for it: `pytest tests/test_common.py -k NAME`.
"""

import functools
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from absl.testing import parameterized

import cl_optax

from conftest import make_params, normal_like, normal_tree, psd, uniform_like


class Case(NamedTuple):
  name: str
  make: Callable[[], optax.GradientTransformation]
  signals: Callable[[Any], dict]  # params -> consolidate signals
  inject: Callable[[], optax.GradientTransformation]  # inject_hyperparams form
  # params -> per-step extra args of `update` (e.g. `ref_grads=` for agem)
  extra_args: Callable[[Any], dict] = lambda params: {}
  # (dtype=float32) -> the params the battery runs on (adapters need LoRA branches)
  params: Callable[..., Any] = make_params


def _rand_importance(params):
  return {"importance": uniform_like(params, 7)}


def _unit_shapes(params):
  """One importance per output unit (last axis) of every leaf (DAS-style state)."""
  return jax.tree.map(lambda p: p.shape[-1:], params)


def _unit_importance(params):
  units = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape[-1:], p.dtype), params)
  return {"importance": uniform_like(units, 8)}


def _ref_grads(params):
  return {"ref_grads": jax.tree.map(lambda x: -x, normal_like(params, 3))}


def _task_grads(params):
  return {
    "task_grads": normal_like(params, 4, stack=(3,)),
    "task_mask": jnp.array([True, True, False]),
  }


def _output_grads(params):
  return {"output_grads": normal_like(params, 5, stack=(2,))}


def _gpm_layers(params):
  del params
  labels = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": True}}
  return labels | {"scale": False, "empty": False}


def _representations(params):
  del params
  return {
    "representations": normal_tree(6, {"dense": {"kernel": (3, 4)}, "head": {"kernel": (5, 3)}})
  }


def _rand_precision(params):
  return {"precision": _rand_importance(params)["importance"]}


def _kron_precision(params):
  del params
  kf = cl_optax.importance.KronFactors
  return {"precision": {"dense": kf(psd(30, 5), psd(31, 3)), "head": kf(psd(32, 3), psd(33, 2))}}


def _no_signals(params):
  return {}


def _writes(params):
  mask = jax.tree.map(lambda u: u > 0.5, uniform_like(params, 11))
  return {"writes": normal_like(params, 9), "write_mask": mask}


_RESET_LAYERS = [("dense/kernel", "dense/bias", "head/kernel")]
_RESET_STATIC = ("inner", "layers", "select", "reinit", "max_units", "seed")


def _resets():
  return cl_optax.unit_resets(
    cl_optax.freeze(), layers=_RESET_LAYERS, select=cl_optax.redo_selector(0.5), max_units=2
  )


def _activations(params):
  """A batch of hidden outputs of `dense` with unit 1 dead (ReDo resets it)."""
  h = jnp.abs(normal_tree(12, (5, 3))) * jnp.array([1.0, 0.0, 1.0])
  return {"activations": [h]}


def _fresh(params):
  return {"fresh": normal_like(params, 9)}


def _redo():
  return cl_optax.redo(
    cl_optax.freeze(), layers=_RESET_LAYERS, threshold=0.5, every=1, centered=True
  )


_CBP_ARGS = {"replacement_rate": 0.5, "maturity_threshold": 0, "max_units": 1}
_CBP_STATIC = ("inner", "layers", "utility", "max_units", "reinit", "seed")


def _cbp():
  return cl_optax.continual_backprop(cl_optax.freeze(), layers=_RESET_LAYERS, **_CBP_ARGS)


def _hat_gates(params):
  del params
  return {"gates": [uniform_like(jnp.zeros(3), 13), uniform_like(jnp.zeros(2), 14)]}


_HAT_STATIC = ("layers", "embeddings", "heads", "orientation")
_PACKNET_STATIC = ("layers", "heads", "train_biases", "owner_dtype")


def _lora_params(dtype=jnp.float32):
  """`make_params` with a LoRA branch (3 slots) on `dense` (cl_optax.adapters' layout)."""
  params = make_params(dtype)
  shapes = {
    "lora_a": (4, 2),
    "lora_b": (2, 3),
    "lora_slots_a": (3, 4, 2),
    "lora_slots_b": (3, 2, 3),
  }
  params["dense"] |= jax.tree.map(lambda x: x.astype(dtype), normal_tree(21, shapes))
  return params


def _covariances(params):
  del params
  return {"next_covariance": {"dense": psd(22, 4)}, "covariance": {"dense": psd(23, 4)}}


_OLORA_STATIC = ("inner", "form", "seed")


_TRGP_STATIC = ("max_tasks", "top", "width", "layers", "official")
_KF_MASK = lambda p: {k: k in ("dense", "head") for k in p}  # noqa: E731
_NCL_STATIC = ("precision", "layers", "prior_mean", "precondition_penalty")

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
  Case(
    "agem",
    cl_optax.agem,
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.agem)(),
    _ref_grads,
  ),
  Case(
    "gem",
    lambda: cl_optax.gem(0.5, max_tasks=3),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.gem, static_args=("max_tasks",))(
      strength=0.5, max_tasks=3
    ),
    _task_grads,
  ),
  Case(
    "experience_replay",
    lambda: cl_optax.experience_replay(0.5),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.experience_replay)(strength=0.5),
    lambda params: {"replay_grads": normal_like(params, 3)},
  ),
  Case(
    "ogd",
    lambda: cl_optax.ogd(4),
    _output_grads,
    lambda: optax.inject_hyperparams(cl_optax.ogd, static_args=("max_directions",))(
      max_directions=4
    ),
  ),
  Case(
    "gpm",
    lambda: cl_optax.gpm(0.9, layers=_gpm_layers),
    _representations,
    lambda: optax.inject_hyperparams(cl_optax.gpm, static_args=("layers",))(
      threshold=0.9, layers=_gpm_layers
    ),
  ),
  Case(
    "sgp",
    lambda: cl_optax.sgp(0.9, alpha=3.0, layers=_gpm_layers),
    _representations,
    lambda: optax.inject_hyperparams(cl_optax.sgp, static_args=("layers",))(
      threshold=0.9, alpha=3.0, layers=_gpm_layers
    ),
  ),
  Case(
    "nscl",
    lambda: cl_optax.nscl(10.0, layers=_gpm_layers),
    _representations,
    lambda: optax.inject_hyperparams(cl_optax.nscl, static_args=("layers",))(
      a=10.0, layers=_gpm_layers
    ),
  ),
  Case(
    "trgp",
    lambda: cl_optax.trgp(0.9, max_tasks=3, layers=_gpm_layers),
    lambda params: _representations(params) | {"next_grads": normal_like(params, 5)},
    lambda: optax.inject_hyperparams(cl_optax.trgp, static_args=_TRGP_STATIC)(
      threshold=0.9, max_tasks=3, layers=_gpm_layers
    ),
  ),
  Case(
    "ncl_diag",
    lambda: cl_optax.ncl(10.0, strength=0.5, damping=0.1),
    _rand_precision,
    lambda: optax.inject_hyperparams(cl_optax.ncl, static_args=_NCL_STATIC)(
      10.0, strength=0.5, damping=0.1
    ),
  ),
  Case(
    "ncl_diag_radius_pre",
    lambda: cl_optax.ncl(10.0, strength=0.5, damping=0.1, radius=0.3, precondition_penalty=True),
    _rand_precision,
    lambda: optax.inject_hyperparams(cl_optax.ncl, static_args=_NCL_STATIC)(
      10.0, strength=0.5, damping=0.1, radius=0.3, precondition_penalty=True
    ),
  ),
  Case(
    "ncl_kfac",
    lambda: optax.masked(
      cl_optax.ncl(
        10.0, strength=0.5, damping=0.1, radius=0.3, precision="kfac", layers=("dense", "head")
      ),
      _KF_MASK,
    ),
    _kron_precision,
    lambda: optax.masked(
      optax.inject_hyperparams(cl_optax.ncl, static_args=_NCL_STATIC)(
        10.0, strength=0.5, damping=0.1, radius=0.3, precision="kfac", layers=("dense", "head")
      ),
      _KF_MASK,
    ),
  ),
  Case(
    "ewc",
    lambda: cl_optax.ewc(3.0),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.ewc)(3.0),
  ),
  Case(
    "ewc_bf16",
    lambda: cl_optax.ewc(3.0, importance_dtype=jnp.bfloat16),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.ewc, static_args=("importance_dtype",))(
      3.0, importance_dtype=jnp.bfloat16
    ),
  ),
  Case(
    "online_ewc",
    lambda: cl_optax.online_ewc(3.0, decay=0.9),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.online_ewc)(3.0, decay=0.9),
  ),
  Case(
    "mas",
    lambda: cl_optax.mas(3.0),
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.mas)(3.0),
  ),
  Case(
    "si",
    lambda: cl_optax.si(3.0, xi=0.1),
    lambda params: {},
    lambda: optax.inject_hyperparams(cl_optax.si, static_args=("include_penalty",))(3.0, xi=0.1),
  ),
  Case(
    "rwalk",
    lambda: cl_optax.rwalk(2.0, every=2),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.rwalk, static_args=("every", "official"))(
      2.0, every=2
    ),
  ),
  Case(
    "boundary_writes",
    cl_optax.boundary_writes,
    _writes,
    lambda: optax.inject_hyperparams(cl_optax.boundary_writes)(),
  ),
  Case(
    "unit_resets",
    _resets,
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.unit_resets, static_args=_RESET_STATIC)(
      cl_optax.freeze(), layers=_RESET_LAYERS, select=cl_optax.redo_selector(0.5), max_units=2
    ),
    _activations,
  ),
  Case(
    "l2_init",
    lambda: cl_optax.l2_init(0.3),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.l2_init)(0.3),
  ),
  Case(
    "shrink_perturb",
    lambda: cl_optax.shrink_perturb(0.4, 0.1),
    _fresh,
    lambda: optax.inject_hyperparams(cl_optax.shrink_perturb)(0.4, 0.1),
  ),
  Case(
    "param_noise",
    lambda: cl_optax.param_noise(0.1, seed=3),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.param_noise, static_args=("seed",))(0.1, seed=3),
  ),
  Case(
    "redo",
    _redo,
    _rand_importance,
    lambda: optax.inject_hyperparams(
      cl_optax.redo, static_args=("inner", "layers", "every", "centered", "max_units", "seed")
    )(cl_optax.freeze(), layers=_RESET_LAYERS, threshold=0.5, every=1, centered=True),
    _activations,
  ),
  Case(
    "continual_backprop",
    _cbp,
    _rand_importance,
    lambda: optax.inject_hyperparams(cl_optax.continual_backprop, static_args=_CBP_STATIC)(
      cl_optax.freeze(), layers=_RESET_LAYERS, **_CBP_ARGS
    ),
    _activations,
  ),
  Case(
    "olora",
    lambda: cl_optax.olora(optax.trace(0.5), 0.5, 0.1),
    _no_signals,
    lambda: optax.inject_hyperparams(cl_optax.olora, static_args=_OLORA_STATIC)(
      optax.trace(0.5), 0.5, 0.1
    ),
    params=_lora_params,
  ),
  Case(
    "inflora",
    lambda: cl_optax.inflora(optax.trace(0.5), 0.9, 1.0),
    _covariances,
    lambda: optax.inject_hyperparams(cl_optax.inflora, static_args=("inner",))(
      optax.trace(0.5), 0.9, 1.0
    ),
    params=_lora_params,
  ),
  Case(
    "hat",
    lambda: cl_optax.hat(("dense", "head")),
    _hat_gates,
    lambda: optax.inject_hyperparams(cl_optax.hat, static_args=_HAT_STATIC)(("dense", "head")),
  ),
  Case(
    "packnet",
    lambda: cl_optax.packnet(heads="scale"),
    lambda params: {"prune": 0.5},
    lambda: optax.inject_hyperparams(cl_optax.packnet, static_args=_PACKNET_STATIC)(heads="scale"),
  ),
]
IDS = [c.name for c in CASES]
SIGNAL_CASES = [c for c in CASES if c.signals(c.params())]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_accepts_unknown_extra_args(case):
  params = case.params()
  tx = case.make()
  state = tx.init(params)
  updates, _ = tx.update(
    normal_like(params),
    state,
    params,
    unexpected_extra_args_your_optimizer_doesnt_expect=1,
    **case.extra_args(params),
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_preserves_bfloat16(case):
  """bfloat16 parameters and gradients give bfloat16 updates (float32 is checked by
  `test_accepts_unknown_extra_args`)."""
  params = case.params(jnp.bfloat16)
  tx = optax.chain(optax.sgd(0.1), case.make())
  state = tx.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
  updates, _ = update(normal_like(params), state, params, case.extra_args(params))
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_retrace_or_recompile_after_consolidate(case, caplog):
  """Steps and consolidates keep the state's tree, shapes and dtypes: one trace, one compile."""
  params = case.params()
  tx = optax.chain(optax.adam(0.1), case.make())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, state, grads, extra):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  states = [state]
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for task in range(3):
      for step in range(2):
        extra = case.extra_args(params)
        params, state = train_step(params, state, normal_like(params, 10 * task + step), extra)
        states.append(state)
      state = cl_optax.consolidate(state, params, **case.signals(params))
      states.append(state)
  for a, b in zip(states, states[1:]):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  chex.clear_trace_counter()
  compiles = [
    r
    for r in caplog.records
    if re.search(r"Finished .*compilation of .*train_step", r.getMessage())
  ]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_works_under_multisteps(case):
  params = case.params()
  k = 3
  tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), case.make()), every_k_schedule=k)
  ref = optax.chain(optax.sgd(1.0), case.make())
  state, ref_state = tx.init(params), ref.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  ref_state = cl_optax.consolidate(ref_state, params, **case.signals(params))
  grads = [normal_like(params, i) for i in range(k)]
  extra = case.extra_args(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
  for g in grads:
    updates, state = update(g, state, params)
  mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
  expected, _ = ref.update(mean, ref_state, params, **extra)
  chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_works_under_inject_hyperparams(case):
  params = case.params()
  tx, ref = case.inject(), case.make()
  state, ref_state = tx.init(params), ref.init(params)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  ref_state = cl_optax.consolidate(ref_state, params, **case.signals(params))
  g = normal_like(params)
  extra = case.extra_args(params)
  got, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(g, state, params)
  expected, _ = ref.update(g, ref_state, params, **extra)
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_step_donating_params_and_state(case):
  """No state leaf may share a buffer with params (a donating step would get it twice)."""
  params = jax.tree.map(jnp.copy, case.params())
  tx = optax.chain(optax.sgd(0.1), case.make())

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads, extra):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for task in range(2):
    params, state = step(params, state, normal_like(params, task), case.extra_args(params))
    state = cl_optax.consolidate(state, params, **case.signals(params))
  params, state = step(params, state, normal_like(params, 5), case.extra_args(params))
  chex.assert_tree_all_finite((params, state))


@functools.cache
def _disabled_jit_reference(case: Case):
  """The case's chain, consolidated state, inputs and the update run under
  `jax.disable_jit()`, computed once for both variants of the jit-equality test."""
  params = case.params()
  grads = normal_like(params)
  tx = optax.chain(optax.adam(0.1), case.make())
  state = cl_optax.consolidate(tx.init(params), params, **case.signals(params))
  extra = case.extra_args(params)
  with jax.disable_jit():
    expected, _ = tx.update(grads, state, params, **extra)
  return tx, (grads, state, params, extra), expected


@pytest.mark.slow
class JitEqualityTest(chex.TestCase):
  """Each transform's update, jitted and not, against the same update run under
  `jax.disable_jit()` (every inner `jit`, `lax.cond`/`switch` and loop in Python)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((case.name, case) for case in CASES)
  def test_same_with_and_without_jit(self, case):
    tx, args, expected = _disabled_jit_reference(case)
    update = self.variant(lambda g, s, p, e: tx.update(g, s, p, **e))
    got, _ = update(*args)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.name for c in SIGNAL_CASES])
def test_missing_signal_is_named(case):
  params = case.params()
  state = case.make().init(params)
  signal = next(iter(case.signals(params)))
  with pytest.raises(ValueError, match=f"needs the signal `{signal}=`"):
    cl_optax.consolidate(state, params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_selection_passes_through(case):
  """Under `optax.masked` with an all-False mask every transform is the identity:
  init, consolidate and (jitted) update work and the updates come out as they went in."""
  params = case.params()
  tx = optax.masked(case.make(), jax.tree.map(lambda _: False, params))
  state = cl_optax.consolidate(tx.init(params), params, **case.signals(params))
  grads = normal_like(params)
  extra = case.extra_args(params)
  updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)
  chex.assert_trees_all_equal(updates, grads)
  state = cl_optax.consolidate(state, params, **case.signals(params))
  chex.assert_trees_all_equal(tx.update(grads, state, params, **extra)[0], grads)
