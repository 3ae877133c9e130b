"""One name per concept: kept hyper-parameters follow their factory; state fields are unique."""

import jax
import jax.numpy as jnp
import optax

import cl_optax

PARAMS = {"kernel": jnp.arange(6.0).reshape(3, 2) / 6.0, "bias": jnp.ones(2)}
GRADS = jax.tree.map(lambda p: jnp.cos(p) - 0.5, PARAMS)


def test_gpm_threshold_signal_overrides_the_factory_threshold():
  params = {"kernel": jnp.zeros((3, 2))}
  reps = {"kernel": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.1]])}
  tx = cl_optax.gpm(threshold=0.4)
  new = cl_optax.consolidate(
    tx.init(params), params, representations=reps, threshold={"kernel": 0.999}
  )
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
