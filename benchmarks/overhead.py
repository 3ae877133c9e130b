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
import functools
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
  "mlp-1000": (784, 1000, 1000, 10),  # ~1.8M parameters (the NCL-KFAC target size)
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
  models: tuple[str, ...] = ()  # models this case runs on (empty: all)


BASES = {
  "sgd": lambda: optax.sgd(0.1),
  "adam": lambda: optax.adam(1e-3),
  "sgdm": lambda: optax.sgd(0.1, momentum=0.9),
}


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


def _consolidate_precision(state, params):
  return cl_optax.consolidate(state, params, precision=_uniform_like(params))


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


_LAYERS = ("layer0", "layer1", "layer2")  # every model in MODELS has three dense layers

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
    lambda b: optax.chain(cl_optax.online_ewc(100.0, 0.9), b),
    _consolidate_importance,
  ),
  Case("mas", "adam", lambda b: optax.chain(cl_optax.mas(1.0), b), _consolidate_importance),
  Case(
    "si",
    "adam",
    lambda b: optax.chain(cl_optax.si(1.0, 0.1), b),
    lambda state, params: cl_optax.consolidate(state, params),
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


def _mlp_loss(params, x, y):
  h = x
  for i in range(len(params)):
    layer = params[f"layer{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def _step_timer(tx, params, state, batch, calls, donate=False):
  """Time of a whole train step (forward, backward, transform, apply) at a batch size."""
  x = jax.random.normal(jax.random.key(3), (batch, next(iter(params.values()))["kernel"].shape[0]))
  y = jax.random.randint(jax.random.key(4), (batch,), 0, 10)

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(p, s):
    g = jax.grad(_mlp_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def run():
    p, s = (jax.tree.map(jnp.copy, (params, state))) if donate else (params, state)
    out = step(p, s)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
      out = step(*out) if donate else step(params, state)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls

  return run


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def _timer(tx, params, extra, calls, donate=False):
  grads = _uniform_like(params, seed=2)
  state = tx.init(params)
  update = jax.jit(
    lambda g, s, p, e: tx.update(g, s, p, **e), donate_argnums=(1,) if donate else ()
  )
  return state, lambda s: _time_calls(update, grads, s, params, extra, calls, donate)


def _time_calls(update, grads, state, params, extra, calls, donate=False):
  # donate: the state is threaded from call to call and its buffers donated, as in a
  # training loop with `donate_argnums`; then a state leaf that passes through
  # unchanged is aliased instead of copied into a fresh output buffer.
  if donate:
    state = jax.tree.map(jnp.copy, state)
  out = update(grads, state, params, extra)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(calls):
    out = update(grads, out[1] if donate else state, params, extra)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def measure(
  case: Case, model: str, repeats: int, calls: int, step_batch: int = 0, donate: bool = False
) -> dict:
  params = mlp_params(MODELS[model])
  base = BASES[case.base]()
  tx = case.make(BASES[case.base]())
  extra = case.extra_args(params)
  base_state, time_base = _timer(base, params, extra, calls, donate)
  state, time_tx = _timer(tx, params, extra, calls, donate)
  state = case.prepare(state, params)
  t_base, t_tx = [], []
  for _ in range(repeats):  # interleaved, so drifts in machine load hit both
    t_base.append(time_base(base_state))
    t_tx.append(time_tx(state))
  row_step = {}
  if step_batch:
    step_base = _step_timer(base, params, base_state, step_batch, calls, donate)
    step_tx = _step_timer(tx, params, state, step_batch, calls, donate)
    s_base, s_tx = [], []
    for _ in range(repeats):
      s_base.append(step_base())
      s_tx.append(step_tx())
    row_step = {"step_batch": step_batch, "step_ratio": min(s_tx) / min(s_base)}
  return row_step | {
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
  parser.add_argument(
    "--donate",
    action="store_true",
    help="donate and thread the optimizer state between calls (as a training loop does)",
  )
  parser.add_argument(
    "--step-batch",
    type=int,
    default=0,
    help="also time a whole train step (forward+backward+update) at this batch size",
  )
  args = parser.parse_args()

  by_name = {c.name: c for c in CASES}
  device = jax.devices()[0]
  print(
    f"device: {device.platform} ({device.device_kind}), {platform.processor() or ''}"
    f" jax {jax.__version__}, min over {args.repeats} repeats x {args.calls} calls"
    + (", state donated" if args.donate else "")
    + (f", step x = train step at batch {args.step_batch}" if args.step_batch else "")
  )
  print(
    f"{'case':<18}{'model':<9}{'base':<6}{'base us':>10}{'update us':>11}"
    f"{'time x':>8}{'state x':>9}" + (f"{'step x':>8}" if args.step_batch else "")
  )
  rows = []
  for model in args.models.split(","):
    for name in args.cases.split(","):
      if by_name[name].models and model not in by_name[name].models:
        continue
      row = measure(by_name[name], model, args.repeats, args.calls, args.step_batch, args.donate)
      rows.append(row)
      print(
        f"{row['case']:<18}{model:<9}{row['base']:<6}{row['base_update_us']:>10.1f}"
        f"{row['update_us']:>11.1f}{row['update_ratio']:>8.2f}"
        f"{row['state_bytes_ratio']:>9.2f}"
        + (f"{row['step_ratio']:>8.2f}" if "step_ratio" in row else ""),
        flush=True,
      )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
