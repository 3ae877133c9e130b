"""The overhead cases of the isolation (HAT, PackNet) and plasticity transforms.

:func:`isolation_cases` and :func:`plasticity_cases` build them from
:mod:`benchmarks.overhead_cases`' `Case`, its MLP layer names and its `uniform_like`,
which it passes in (this module imports nothing from there, so either module can be
imported first); `overhead_cases.CASES` ends with them.
"""

from __future__ import annotations

import jax
import optax

import cl_optax


def isolation_cases(Case, _LAYERS):  # noqa: N803
  """HAT and PackNet."""
  _CASES = []

  def _consolidate_gates(state, params):
    """HAT's gates of a first task: a uniform draw per hidden unit."""
    gates = [jax.random.uniform(jax.random.key(i), params[n]["bias"].shape) for i, n in enumerate(
      _LAYERS[:-1])]  # fmt: skip
    return cl_optax.consolidate(state, params, gates=gates)

  def _prune_and_finish(state, params):
    """PackNet after a first task: half of it pruned (the write lands), then frozen."""
    state = cl_optax.consolidate(state, params, prune=0.5)
    _, state = cl_optax.apply_pending_writes(params, state)
    return cl_optax.consolidate(state, params, finish=True)

  _CASES += [
    Case(
      "hat",
      "adam",
      lambda b: optax.chain(b, cl_optax.hat(_LAYERS[:-1])),
      _consolidate_gates,
      models=("mlp", "mlp-10m", "mlp-1000"),  # gates per hidden MLP layer
    ),
    Case(
      "packnet",
      "adam",
      lambda b: optax.chain(b, cl_optax.packnet(heads="head")),
      _prune_and_finish,
      models=("mlp", "mlp-10m", "mlp-1000"),
    ),
  ]
  return _CASES


def plasticity_cases(Case, _LAYERS, uniform_like):  # noqa: N803
  """L2 Init, parameter noise, shrink and perturb, CBP and ReDo."""
  _CASES = []
  # ---------------------------------------------------------------- plasticity
  _UNITS = [
    (f"{a}/kernel", f"{a}/bias", f"{b}/kernel", f"{b}/bias") for a, b in zip(_LAYERS, _LAYERS[1:])
  ]
  _MLPS = ("mlp", "mlp-1000", "mlp-10m")

  def _hidden_activations(params, batch=32):
    """``activations=`` for CBP / ReDo: a ``[batch, n]`` post-ReLU batch per hidden layer."""
    return {
      "activations": [
        jax.random.uniform(jax.random.key(i), (batch, params[kin.split("/")[0]]["kernel"].shape[1]))
        for i, (kin, *_) in enumerate(_UNITS)
      ]
    }

  def _consolidate_fresh(state, params):
    return cl_optax.consolidate(state, params, fresh=uniform_like(params, seed=5))

  _CASES += [
    Case("l2_init", "sgd", lambda b: optax.chain(cl_optax.l2_init(1e-4), b)),
    Case("param_noise", "sgd", lambda b: optax.chain(b, cl_optax.param_noise(1e-5))),
    # the step after the boundary: the write (t - p) and Adam's restart
    Case("shrink_perturb", "adam", lambda b: cl_optax.shrink_perturb(inner=b), _consolidate_fresh),
    Case(
      "continual_backprop",  # utilities every step; one unit per layer re-drawn every step
      "sgd",
      lambda b: cl_optax.continual_backprop(
        b, layers=_UNITS, replacement_rate=1.0, maturity_threshold=0
      ),
      extra_args=_hidden_activations,
      models=_MLPS,
    ),
    Case(
      "continual_backprop_rare",  # the online permuted-MNIST rate: the reset cond not taken
      "sgd",
      lambda b: cl_optax.continual_backprop(
        b, layers=_UNITS, replacement_rate=1e-6, maturity_threshold=100
      ),
      extra_args=_hidden_activations,
      models=_MLPS,
    ),
    Case(
      "redo_every_step",  # the worst case: scores and recycles at every update
      "adam",
      lambda b: cl_optax.redo(b, layers=[u[:3] for u in _UNITS], threshold=0.5, every=1),
      extra_args=_hidden_activations,
      models=_MLPS,
    ),
    Case(
      "redo_period",  # ReDo's usual period: the steps between recycles
      "adam",
      lambda b: cl_optax.redo(b, layers=[u[:3] for u in _UNITS], threshold=0.01, every=1000),
      extra_args=_hidden_activations,
      models=_MLPS,
    ),
  ]
  return _CASES
