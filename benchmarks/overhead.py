"""Update time and state bytes of each cl_optax transform vs its base optimiser.

Every number is a ratio to the plain base optimiser measured in the same run
(same process, same model, interleaved repeats, minimum over repeats), so it
says what a transform adds, not how fast this machine is.

  python -m benchmarks.overhead                       # every case, both models
  python -m benchmarks.overhead --cases soft_mask --models mlp --json out.json

Add a transform by appending a `Case` to `CASES`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax

MODELS = {
  "mlp": (784, 256, 256, 10),  # ~0.27M parameters
  "mlp-10m": (784, 3000, 3000, 10),  # ~11.4M parameters
  "lm": None,  # the byte-level Transformer of examples/continual_pretraining.py, ~0.88M
}


def example_lm_params(seed=0):
  """Parameters of the example's LM (default config), as a plain nested dict."""
  import importlib.util
  import pathlib

  from flax import nnx

  path = pathlib.Path(__file__).parent.parent / "examples" / "continual_pretraining.py"
  spec = importlib.util.spec_from_file_location("continual_pretraining", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = {"d": 128, "layers": 4, "heads": 4, "ff": 512, "length": 64, "dropout": 0.1}
  return nnx.state(module.ByteLM(cfg, nnx.Rngs(seed)), nnx.Param).to_pure_dict()


def model_params(model):
  return example_lm_params() if model == "lm" else mlp_params(MODELS[model])


def mlp_params(sizes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return {
    f"layer{i}": {
      "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
      "bias": jnp.zeros((n,)),
    }
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def _uniform_like(params, seed=1):
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


BASES = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-3)}


def _consolidate_importance(state, params):
  return cl_optax.consolidate(state, params, importance=_uniform_like(params))


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
  return cl_optax.consolidate(state, params, importance=_uniform_like(das_shapes(params)))


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


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def _timer(tx, params, extra, calls):
  grads = _uniform_like(params, seed=2)
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
  return state, lambda s: _time_calls(update, grads, s, params, extra, calls)


def _time_calls(update, grads, state, params, extra, calls):
  out = update(grads, state, params, extra)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(calls):
    out = update(grads, state, params, extra)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def measure(case: Case, model: str, repeats: int, calls: int) -> dict:
  params = model_params(model)
  base = BASES[case.base]()
  tx = case.make(BASES[case.base]())
  extra = case.extra_args(params)
  base_state, time_base = _timer(base, params, extra, calls)
  state, time_tx = _timer(tx, params, extra, calls)
  state = case.prepare(state, params)
  t_base, t_tx = [], []
  for _ in range(repeats):  # interleaved, so drifts in machine load hit both
    t_base.append(time_base(base_state))
    t_tx.append(time_tx(state))
  return {
    "case": case.name,
    "model": model,
    "base": case.base,
    "n_params": int(sum(p.size for p in jax.tree.leaves(params))),
    "base_update_us": 1e6 * min(t_base),
    "update_us": 1e6 * min(t_tx),
    "update_ratio": min(t_tx) / min(t_base),
    "state_bytes_ratio": state_bytes(state) / max(state_bytes(base_state), 1),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(c.name for c in CASES))
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--json", default=None, help="write the rows to this file")
  args = parser.parse_args()

  by_name = {c.name: c for c in CASES}
  device = jax.devices()[0]
  print(
    f"device: {device.platform} ({device.device_kind}), {platform.processor() or ''}"
    f" jax {jax.__version__}, min over {args.repeats} repeats x {args.calls} calls"
  )
  print(
    f"{'case':<18}{'model':<9}{'base':<6}{'base us':>10}{'update us':>11}"
    f"{'time x':>8}{'state x':>9}"
  )
  rows = []
  for model in args.models.split(","):
    for name in args.cases.split(","):
      row = measure(by_name[name], model, args.repeats, args.calls)
      rows.append(row)
      print(
        f"{row['case']:<18}{model:<9}{row['base']:<6}{row['base_update_us']:>10.1f}"
        f"{row['update_us']:>11.1f}{row['update_ratio']:>8.2f}"
        f"{row['state_bytes_ratio']:>9.2f}",
        flush=True,
      )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
