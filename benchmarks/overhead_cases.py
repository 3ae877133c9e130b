"""The models and cases :mod:`benchmarks.overhead` and :mod:`benchmarks.floor` time.

A `Case` is one transform chained with its base optimiser, the signal its
``consolidate`` needs, and its per-step extra args. Add a transform by
appending a `Case` to `CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks import lm, overhead_cases_isolation_plasticity
from benchmarks.continual.model import mlp_init, mlp_layer_names

MODELS = {
  "mlp": (784, 256, 256, 10),  # ~0.27M parameters
  "mlp-10m": (784, 3000, 3000, 10),  # ~11.4M parameters
  "mlp-1000": (784, 1000, 1000, 10),  # ~1.8M parameters (the NCL-KFAC target size)
  "lm": None,  # the byte-level Transformer of examples/continual_pretraining.py, ~0.88M
  # the same Transformer at benchmark sizes (benchmarks/lm.py), float32 / bfloat16 parameters
  "lm-10m": None,
  "lm-10m-bf16": None,
  "lm-100m": None,
  "lm-100m-bf16": None,
}
BIG = 50_000_000  # from this size: element-wise cases only, few repeats (memory and time)


def model_params(model):
  """The parameters of a `MODELS` entry: the LMs of :mod:`benchmarks.lm`, else the MLP."""
  name = model.removesuffix("-bf16")
  if name in lm.CONFIGS:
    return lm.lm_params(name, jnp.bfloat16 if model.endswith("-bf16") else jnp.float32)
  return mlp_params(MODELS[model])


def mlp_params(sizes, seed=0):
  """The continual runner's MLP (``layer0, ..., head``) at these sizes."""
  return mlp_init(jax.random.key(seed), sizes)


def uniform_like(params, seed=1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.uniform(k, p.shape) for k, p in zip(keys, leaves)])


class Case(NamedTuple):
  """One row: `make(base)` wraps a base optimiser; `prepare` ends a first task."""

  name: str
  base: str  # key of BASES
  make: Callable[[optax.GradientTransformation], optax.GradientTransformation]
  prepare: Callable[[Any, Any], Any] = lambda state, params: state
  extra_args: Callable[[Any], dict] = lambda params: {}
  models: tuple[str, ...] = ()  # models this case runs on (empty: all)


BASES = {
  "sgd": lambda: optax.sgd(0.1),
  "adam": lambda: optax.adam(1e-3),
  "sgdm": lambda: optax.sgd(0.1, momentum=0.9),
}


def _consolidate_importance(state, params):
  return cl_optax.consolidate(state, params, importance=uniform_like(params))


def das_units_spec(params, path=()):
  """DAS units of any params: attention layers (query/key/value/out) -> heads,
  other layers with a kernel -> their output units; embeddings, norms: none."""
  if not isinstance(params, dict):
    return {}
  if {"query", "key", "value", "out"} <= set(params):
    return {path: ("heads", jnp.zeros(params["query"]["kernel"].shape[-2]))}
  if "kernel" in params:
    return {path: ("units", jnp.zeros(params["kernel"].shape[-1]))}
  spec = {}
  for k, v in params.items():
    spec.update(das_units_spec(v, (*path, k)))
  return spec


def das_shapes(params):
  return cl_optax.importance.das_param_importance(params, das_units_spec(params))


def _consolidate_unit_importance(state, params):
  return cl_optax.consolidate(state, params, importance=uniform_like(das_shapes(params)))


CASES = [
  Case(
    "soft_mask", "adam", lambda b: optax.chain(b, cl_optax.soft_mask()), _consolidate_importance
  ),
  Case(
    "soft_mask_bf16",
    "adam",
    lambda b: optax.chain(b, cl_optax.soft_mask(importance_dtype=jnp.bfloat16)),
    _consolidate_importance,
  ),
  Case("freeze", "adam", lambda b: optax.chain(b, cl_optax.freeze()), _consolidate_importance),
  Case(
    "soft_mask_units",  # DAS: one importance per head / unit, broadcast
    "adam",
    lambda b: optax.chain(b, cl_optax.soft_mask(importance_shapes=das_shapes)),
    _consolidate_unit_importance,
  ),
]


# ------------------------------------------------------- gradient projection
# Extra args are built so that the projection runs (some <g, g_k> < 0): the
# worst case, where A-GEM / GEM do all their work.


def _normal_like(params, seed, lead=()):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [jax.random.normal(k, lead + p.shape) for k, p in zip(keys, leaves)]
  )


def _agem_extra(params):
  return {"ref_grads": jax.tree.map(lambda x: -x, uniform_like(params, seed=2))}


def gem_extra(k):
  def extra(params):
    return {"task_grads": _normal_like(params, 3, (k,)), "task_mask": jnp.ones((k,), bool)}

  return extra


OGD_DIRECTIONS = 10


def _consolidate_output_grads(state, params):
  grads = _normal_like(params, 4, (OGD_DIRECTIONS,))
  return cl_optax.consolidate(state, params, output_grads=grads)


def _consolidate_representations(state, params):
  n = 300  # samples per layer, as GPM's PMNIST run
  reps = {
    name: {"kernel": jax.random.uniform(jax.random.key(i), (n, layer["kernel"].shape[0]))}
    for i, (name, layer) in enumerate(params.items())
  }
  return cl_optax.consolidate(state, params, representations=reps)


CASES += [
  Case("agem", "sgd", lambda b: optax.chain(cl_optax.agem(), b), extra_args=_agem_extra),
  Case(
    "gem_k5",
    "sgd",
    lambda b: optax.chain(cl_optax.gem(max_tasks=5), b),
    extra_args=gem_extra(5),
  ),
  Case(
    "gem_k20",
    "sgd",
    lambda b: optax.chain(cl_optax.gem(max_tasks=20), b),
    extra_args=gem_extra(20),
  ),
  Case(
    f"ogd_{OGD_DIRECTIONS}",
    "sgd",
    lambda b: optax.chain(cl_optax.ogd(OGD_DIRECTIONS), b),
    _consolidate_output_grads,
  ),
  Case(
    "gpm",
    "sgd",
    lambda b: optax.chain(cl_optax.gpm(0.97), b),
    _consolidate_representations,
    models=("mlp", "mlp-10m", "mlp-1000"),  # representations are built per MLP layer
  ),
  Case(
    "sgp",
    "sgd",
    lambda b: optax.chain(cl_optax.sgp(0.97), b),
    _consolidate_representations,
    models=("mlp", "mlp-10m", "mlp-1000"),
  ),
  Case(
    "trgp",
    "sgd",
    lambda b: optax.chain(cl_optax.trgp(0.97, max_tasks=10), b),
    _consolidate_representations,
    models=("mlp", "mlp-10m", "mlp-1000"),
  ),
  Case(
    "nscl",
    "adam",
    lambda b: optax.chain(b, cl_optax.nscl()),  # after the base optimiser
    _consolidate_representations,
    models=("mlp", "mlp-10m", "mlp-1000"),
  ),
]


def _consolidate_precision(state, params):
  return cl_optax.consolidate(state, params, precision=uniform_like(params))


def _consolidate_kron(state, params):
  def factors(n, seed):  # a diagonal-plus-ones PSD factor: the values do not change the timing
    return jnp.diag(jax.random.uniform(jax.random.key(seed), (n,))) + 1.0 / n

  kron = {
    name: cl_optax.importance.KronFactors(
      factors(layer["kernel"].shape[0] + 1, i), factors(layer["kernel"].shape[1], i + 7)
    )
    for i, (name, layer) in enumerate(params.items())
  }
  return cl_optax.consolidate(state, params, precision=kron)


_LAYERS = mlp_layer_names(3)  # every MLP in MODELS has three dense layers

CASES += [
  Case("ewc", "adam", lambda b: optax.chain(cl_optax.ewc(100.0), b), _consolidate_importance),
  Case(
    "ewc_bf16",
    "adam",
    lambda b: optax.chain(cl_optax.ewc(100.0, importance_dtype=jnp.bfloat16), b),
    _consolidate_importance,
  ),
  Case(
    "online_ewc",
    "adam",
    lambda b: optax.chain(cl_optax.online_ewc(100.0, decay=0.9), b),
    _consolidate_importance,
  ),
  Case("mas", "adam", lambda b: optax.chain(cl_optax.mas(1.0), b), _consolidate_importance),
  Case(
    "si",
    "adam",
    lambda b: optax.chain(cl_optax.si(1.0, xi=0.1), b),
    lambda state, params: cl_optax.consolidate(state, params),
  ),
  Case(
    "rwalk",
    "adam",
    lambda b: optax.chain(cl_optax.rwalk(2.0), b),
    lambda state, params: cl_optax.consolidate(state, params),
  ),
  Case(
    "task_free_online_ewc",
    "adam",
    lambda b: optax.chain(
      cl_optax.task_free(cl_optax.online_ewc(1.0, decay=0.9), every=100, signals=["importance"]),
      b,
    ),
    extra_args=lambda params: {"importance": jax.tree.map(jnp.ones_like, params)},
  ),
  Case(
    "ncl_diag",
    "sgdm",
    lambda b: optax.chain(cl_optax.ncl(60000.0), b),
    _consolidate_precision,
  ),
  Case(
    "ncl_kfac",
    "sgdm",
    lambda b: optax.chain(cl_optax.ncl(60000.0, precision="kfac", layers=_LAYERS), b),
    _consolidate_kron,
    models=("mlp", "mlp-1000"),
  ),
]


# HAT, PackNet and the plasticity transforms (benchmarks/overhead_cases_isolation_plasticity.py)
_MORE = overhead_cases_isolation_plasticity
CASES += _MORE.isolation_cases(Case, _LAYERS) + _MORE.plasticity_cases(Case, _LAYERS, uniform_like)
