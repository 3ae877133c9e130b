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
}


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
]


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def _timer(tx, params, extra, calls):
  """Times `calls` chained updates; the state is donated, as in a train step."""
  grads = _uniform_like(params, seed=2)
  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e), donate_argnums=1)

  def time_calls(state):
    updates, state = update(grads, state, params, extra)  # warm-up / compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls):
      updates, state = update(grads, state, params, extra)
    jax.block_until_ready((updates, state))
    return (time.perf_counter() - start) / calls, state

  return time_calls


def measure(case: Case, model: str, repeats: int, calls: int) -> dict:
  params = mlp_params(MODELS[model])
  base = BASES[case.base]()
  tx = case.make(BASES[case.base]())
  extra = case.extra_args(params)
  base_state, state = base.init(params), case.prepare(tx.init(params), params)
  bytes_base, bytes_tx = state_bytes(base_state), state_bytes(state)
  time_base, time_tx = _timer(base, params, extra, calls), _timer(tx, params, extra, calls)
  t_base, t_tx = [], []
  for _ in range(repeats):  # interleaved, so drifts in machine load hit both
    t, base_state = time_base(base_state)
    t_base.append(t)
    t, state = time_tx(state)
    t_tx.append(t)
  return {
    "case": case.name,
    "model": model,
    "base": case.base,
    "n_params": int(sum(p.size for p in jax.tree.leaves(params))),
    "base_update_us": 1e6 * min(t_base),
    "update_us": 1e6 * min(t_tx),
    "update_ratio": min(t_tx) / min(t_base),
    "state_bytes_ratio": bytes_tx / max(bytes_base, 1),
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
