"""Update time and state bytes of each cl_optax transform vs its base optimiser.

Every number is a ratio to the plain base optimiser measured in the same run
(same process, same model, interleaved repeats, minimum over repeats), so it
says what a transform adds, not how fast this machine is. "update" is the
optimiser's share of a train step: ``update`` + ``apply_updates`` on fixed
gradients, jitted with params and state donated.

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
import optax

import cl_optax
from benchmarks.continual.model import mlp_apply, mlp_init, mlp_layer_names

MODELS = {
  "mlp": (784, 256, 256, 10),  # ~0.27M parameters
  "mlp-10m": (784, 3000, 3000, 10),  # ~11.4M parameters
  "mlp-1000": (784, 1000, 1000, 10),  # ~1.8M parameters (the NCL-KFAC target size)
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
  """The continual runner's MLP (``layer0, ..., head``) at these sizes."""
  return mlp_init(jax.random.key(seed), sizes)


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
  return {"ref_grads": jax.tree.map(lambda x: -x, _uniform_like(params, seed=2))}


def _gem_extra(k):
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
    extra_args=_gem_extra(5),
  ),
  Case(
    "gem_k20",
    "sgd",
    lambda b: optax.chain(cl_optax.gem(max_tasks=20), b),
    extra_args=_gem_extra(20),
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


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def _timer(tx, params, extra, calls):
  """Times `calls` chained `update` + `apply_updates`, params and state donated.

  This is the optimiser's share of a real train step. Timing `tx.update`
  alone and returning `updates` misleads: JAX aliases donated buffers to
  outputs by shape and order, so the first donated state leaf is reused for
  `updates` and every state leaf that passes through unchanged (importance,
  anchors) is then copied.
  """
  grads = _uniform_like(params, seed=2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, e):
    updates, s = tx.update(grads, s, p, **e)
    return optax.apply_updates(p, updates), s

  def time_calls(state):
    p, state = step(jax.tree.map(jnp.copy, params), state, extra)  # warm-up / compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls):
      p, state = step(p, state, extra)
    jax.block_until_ready((p, state))
    return (time.perf_counter() - start) / calls, state

  return time_calls


def measure(case: Case, model: str, repeats: int, calls: int, step_batch: int = 0) -> dict:
  params = model_params(model)
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
  row_step = {}
  if step_batch and model != "lm":  # the step timer trains the MLPs
    step_base = _step_timer(base, params, base_state, step_batch, calls)
    step_tx = _step_timer(tx, params, state, step_batch, calls)
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
    # sgd keeps no state: then the ratio is to the parameters' bytes instead
    "state_bytes_ratio": bytes_tx / (bytes_base or state_bytes(params)),
    "state_bytes_vs": "base" if bytes_base else "params",
  }


# ------------------------------------------- whole train step (A-GEM vs GEM)


def _ce(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def _step_timer(tx, params, state, batch, calls):
  """Times a whole train step (forward, backward, transform, apply); state donated."""
  x = jax.random.normal(jax.random.key(3), (batch, params["layer0"]["kernel"].shape[0]))
  y = jax.random.randint(jax.random.key(4), (batch,), 0, 10)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s):
    u, s = tx.update(jax.grad(_ce)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  def run():
    out = step(*jax.tree.map(jnp.copy, (params, state)))
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
      out = step(*out)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls

  return run


def measure_train_steps(
  model: str,
  repeats: int,
  calls: int,
  *,
  n_tasks: int = 20,
  mem_per_task: int = 256,
  batch: int = 10,
  ref_batch: int = 256,
) -> dict:
  """One jitted SGD step, including the memory forward/backward, per method.

  sgd: the batch gradient. agem: plus the gradient on ``ref_batch`` memory
  samples. gem: plus the gradients of ``n_tasks`` tasks' memories
  (``mem_per_task`` samples each) in one ``vmap`` ped backward.
  """
  sizes = MODELS[model]
  params = mlp_params(sizes)
  keys = jax.random.split(jax.random.key(5), 6)
  x = jax.random.uniform(keys[0], (batch, sizes[0]))
  y = jax.random.randint(keys[1], (batch,), 0, sizes[-1])
  xr = jax.random.uniform(keys[2], (ref_batch, sizes[0]))
  yr = jax.random.randint(keys[3], (ref_batch,), 0, sizes[-1])
  xm = jax.random.uniform(keys[4], (n_tasks, mem_per_task, sizes[0]))
  ym = jax.random.randint(keys[5], (n_tasks, mem_per_task), 0, sizes[-1])
  mask = jnp.ones((n_tasks,), bool)
  grad = jax.grad(_ce)
  txs = {
    "sgd": optax.sgd(0.1),
    "agem": optax.chain(cl_optax.agem(), optax.sgd(0.1)),
    "gem": optax.chain(cl_optax.gem(max_tasks=n_tasks), optax.sgd(0.1)),
  }

  @jax.jit
  def sgd_step(params, state):
    updates, state = txs["sgd"].update(grad(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def agem_step(params, state):
    ref = grad(params, xr, yr)
    updates, state = txs["agem"].update(grad(params, x, y), state, params, ref_grads=ref)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def gem_step(params, state):
    task_grads = jax.vmap(grad, in_axes=(None, 0, 0))(params, xm, ym)
    updates, state = txs["gem"].update(
      grad(params, x, y), state, params, task_grads=task_grads, task_mask=mask
    )
    return optax.apply_updates(params, updates), state

  steps = {"sgd": sgd_step, "agem": agem_step, "gem": gem_step}
  states = {k: tx.init(params) for k, tx in txs.items()}

  def time_one(name):
    out = steps[name](params, states[name])
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
      out = steps[name](params, states[name])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls, out[1]

  times = {k: [] for k in steps}
  last = {}
  for _ in range(repeats):
    for name in steps:
      t, last[name] = time_one(name)
      times[name].append(t)
  best = {k: min(v) for k, v in times.items()}
  return {
    "model": model,
    "n_tasks": n_tasks,
    "mem_per_task": mem_per_task,
    "ref_batch": ref_batch,
    "batch": batch,
    "sgd_step_us": 1e6 * best["sgd"],
    "agem_step_us": 1e6 * best["agem"],
    "gem_step_us": 1e6 * best["gem"],
    "agem_over_sgd": best["agem"] / best["sgd"],
    "gem_over_agem": best["gem"] / best["agem"],
    "agem_projected": bool(optax.tree.get(last["agem"], "agem_projected") > 0),
    "gem_projected": bool(optax.tree.get(last["gem"], "gem_projected") > 0),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(c.name for c in CASES))
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--json", default=None, help="write the rows to this file")
  parser.add_argument(
    "--step-batch",
    type=int,
    default=0,
    help="also time each case's whole train step (forward+backward+update) at this batch size",
  )
  parser.add_argument(
    "--steps",
    default="mlp",
    help="models for the whole-train-step rows (A-GEM vs GEM); empty to skip",
  )
  parser.add_argument(
    "--mem-per-task",
    default="256,13",
    help="GEM memory per task for the step rows (256: the paper; 13: 20 tasks x 13 ~ A-GEM's 256)",
  )
  args = parser.parse_args()

  by_name = {c.name: c for c in CASES}
  device = jax.devices()[0]
  print(
    f"device: {device.platform} ({device.device_kind}), {platform.processor() or ''}"
    f" jax {jax.__version__}, min over {args.repeats} repeats x {args.calls} calls,"
    " update + apply_updates with params and state donated"
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
      row = measure(by_name[name], model, args.repeats, args.calls, args.step_batch)
      rows.append(row)
      print(
        f"{row['case']:<18}{model:<9}{row['base']:<6}{row['base_update_us']:>10.1f}"
        f"{row['update_us']:>11.1f}{row['update_ratio']:>8.2f}"
        f"{row['state_bytes_ratio']:>9.2f}"
        + (f"{row['step_ratio']:>8.2f}" if "step_ratio" in row else "")
        + ("" if row["state_bytes_vs"] == "base" else " (state x of params)"),
        flush=True,
      )
  step_rows = []
  if args.steps:
    print(
      f"\nwhole jitted train step (batch 10; A-GEM: + {256} memory samples; GEM: + 20 tasks x m"
      " memory samples, one vmapped backward)"
    )
    print(
      f"{'model':<9}{'m':>5}{'sgd us':>10}{'agem us':>10}{'gem us':>11}"
      f"{'agem/sgd':>10}{'gem/agem':>10}  projected"
    )
    for model in args.steps.split(","):
      for m in (int(v) for v in args.mem_per_task.split(",")):
        row = measure_train_steps(model, args.repeats, args.calls, mem_per_task=m)
        step_rows.append(row)
        print(
          f"{model:<9}{m:>5}{row['sgd_step_us']:>10.1f}{row['agem_step_us']:>10.1f}"
          f"{row['gem_step_us']:>11.1f}{row['agem_over_sgd']:>10.2f}{row['gem_over_agem']:>10.2f}"
          f"  agem={row['agem_projected']} gem={row['gem_projected']}",
          flush=True,
        )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(device), "rows": rows, "steps": step_rows}, f, indent=1)


if __name__ == "__main__":
  main()
