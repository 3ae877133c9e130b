"""One name per concept: old spellings warn and act as the new ones; state fields are unique."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import cl_optax

PARAMS = {"kernel": jnp.arange(6.0).reshape(3, 2) / 6.0, "bias": jnp.ones(2)}
GRADS = jax.tree.map(lambda p: jnp.cos(p) - 0.5, PARAMS)


def _run(tx, **signals):
  """Two updates around one consolidate: the result depends on every hyper-parameter."""
  state = tx.init(PARAMS)
  out, state = tx.update(GRADS, state, PARAMS)
  state = cl_optax.consolidate(state, PARAMS, **signals)
  out, state = tx.update(GRADS, state, jax.tree.map(lambda p: p + 0.1, PARAMS))
  return out, state


IMP = {"importance": jax.tree.map(lambda p: jnp.full(p.shape, 0.7), PARAMS)}
PREC = {"precision": jax.tree.map(lambda p: jnp.full(p.shape, 2.0), PARAMS)}
OLD_AND_NEW = [
  ("si damping=", lambda: cl_optax.si(2.0, damping=0.3), lambda: cl_optax.si(2.0, xi=0.3), {}),
  ("si positional xi", lambda: cl_optax.si(2.0, 0.3), lambda: cl_optax.si(2.0, xi=0.3), {}),
  (
    "online_ewc positional decay",
    lambda: cl_optax.online_ewc(2.0, 0.5),
    lambda: cl_optax.online_ewc(2.0, decay=0.5),
    IMP,
  ),
  (
    "ncl positional floats",
    lambda: cl_optax.ncl(10.0, 0.5, 0.2, 0.9, 3.0),
    lambda: cl_optax.ncl(10.0, strength=0.5, damping=0.2, decay=0.9, radius=3.0),
    PREC,
  ),
]


@pytest.mark.parametrize("name,old,new,signals", OLD_AND_NEW, ids=[c[0] for c in OLD_AND_NEW])
def test_deprecated_spelling_warns_and_matches(name, old, new, signals):
  with pytest.warns(DeprecationWarning):
    tx_old = old()
  chex.assert_trees_all_equal(_run(tx_old, **signals), _run(new(), **signals))


def test_gem_memory_strength_warns_and_sets_strength():
  with pytest.warns(DeprecationWarning, match="strength="):
    old = cl_optax.gem(memory_strength=0.0, max_tasks=2, eps=0.0)
  new = cl_optax.gem(strength=0.0, max_tasks=2, eps=0.0)
  ref = jax.tree.map(lambda g: jnp.stack([-g, g]), GRADS)
  kw = {"task_grads": ref, "task_mask": jnp.array([True, False])}
  chex.assert_trees_all_equal(
    old.update(GRADS, old.init(PARAMS), PARAMS, **kw),
    new.update(GRADS, new.init(PARAMS), PARAMS, **kw),
  )


def test_gpm_threshold_signal_old_name_warns_and_matches():
  params = {"kernel": jnp.zeros((3, 2))}
  reps = {"kernel": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.1]])}
  tx = cl_optax.gpm(threshold=0.4)
  with pytest.warns(DeprecationWarning, match="threshold="):
    old = cl_optax.consolidate(
      tx.init(params), params, representations=reps, gpm_threshold={"kernel": 0.999}
    )
  new = cl_optax.consolidate(
    tx.init(params), params, representations=reps, threshold={"kernel": 0.999}
  )
  chex.assert_trees_all_equal(old, new)
  assert int(new.feature_count["kernel"]) == 3  # 0.999 of the energy needs all three
  default = cl_optax.consolidate(tx.init(params), params, representations=reps)
  assert int(default.feature_count["kernel"]) == 1  # the factory's 0.4


def test_kept_hyperparameters_follow_inject_hyperparams():
  """The naming rule: a hyper-parameter kept in the state is refreshed at every update."""
  cases = [
    (cl_optax.freeze, {"threshold": 0.5}, "threshold", "freeze_threshold"),
    (cl_optax.online_ewc, {"decay": 0.5}, "decay", "online_ewc_decay"),
    (cl_optax.si, {"xi": 0.5}, "xi", "si_xi"),
    (cl_optax.gpm, {"threshold": 0.5}, "threshold", "gpm_threshold"),
    (cl_optax.ncl, {"data_size": 1.0, "decay": 0.5}, "decay", "ncl_decay"),
  ]
  for factory, kw, hp, field in cases:
    tx = optax.inject_hyperparams(factory)(**kw)
    state = tx.init(PARAMS)
    state.hyperparams[hp] = jnp.asarray(0.25)
    _, state = tx.update(GRADS, state, PARAMS)
    assert float(optax.tree.get(state, field)) == 0.25, (factory.__name__, field)


def test_state_fields_are_unique_across_transforms():
  """``optax.tree.get(opt_state, name)`` finds one field, whichever transforms are chained."""
  states = [
    cl_optax.SoftMaskState,
    cl_optax.FreezeState,
    cl_optax.AGEMState,
    cl_optax.GEMState,
    cl_optax.OGDState,
    cl_optax.GPMState,
    cl_optax.NCLState,
    cl_optax.EWCState,
    cl_optax.OnlineEWCState,
    cl_optax.MASState,
    cl_optax.SIState,
    cl_optax.ExperienceReplayState,
  ]
  seen = {}
  for s in states:
    for f in s._fields:
      assert f not in seen, f"{f} is a field of both {seen[f]} and {s.__name__}"
      seen[f] = s.__name__
