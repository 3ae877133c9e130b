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
from benchmarks import floor, lm
from benchmarks.continual.model import mlp_apply, mlp_init, mlp_layer_names

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
  if model == "lm":
    return example_lm_params()
  name = model.removesuffix("-bf16")
  if name in lm.CONFIGS:
    return lm.lm_params(name, jnp.bfloat16 if model.endswith("-bf16") else jnp.float32)
  return mlp_params(MODELS[model])


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
  """Bytes of the array leaves (arrays or ``jax.ShapeDtypeStruct`` s)."""
  leaves = jax.tree.leaves(state)
  return sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x, "dtype"))


def measure(case: Case, model: str, repeats: int, calls: int, step_batch: int = 0) -> dict:
  """The update's time vs the base's and vs its floor; with ``step_batch``, the train step's."""
  params = model_params(model)
  row = floor.measure(case, params, repeats, calls)
  base = BASES[case.base]()
  tx = case.make(BASES[case.base]())
  bytes_base = state_bytes(jax.eval_shape(base.init, params))
  row_step = {}
  if step_batch:
    step_base = _step_timer(base, params, lambda: base.init(params), step_batch, calls, model)
    step_tx = _step_timer(
      tx, params, lambda: case.prepare(tx.init(params), params), step_batch, calls, model
    )
    s_base, s_tx = [], []
    for _ in range(repeats):
      s_base.append(step_base())
      s_tx.append(step_tx())
    row_step = {
      "step_batch": step_batch,
      "base_step_us": 1e6 * min(s_base),
      "step_us": 1e6 * min(s_tx),
      "step_ratio": min(s_tx) / min(s_base),
    }
  return row_step | {
    "case": case.name,
    "model": model,
    "base": case.base,
    "n_params": row["n_params"],
    "base_update_us": 1e6 * row["base_s"],
    "update_us": 1e6 * row["update_s"],
    "update_ratio": row["ratio"],
    # sgd keeps no state: then the ratio is to the parameters' bytes instead
    "state_bytes": row["state_bytes"],
    "state_bytes_ratio": row["state_bytes"] / (bytes_base or state_bytes(params)),
    "state_bytes_vs": "base" if bytes_base else "params",
    "bandwidth_gbs": row["bandwidth"] / 1e9,
    # element-wise cases (floor.TRAFFIC); for the others (GEM, OGD, GPM, K-FAC: bound by
    # FLOPs) the floor columns hold the base optimiser's floor
    "elementwise": case.name in floor.TRAFFIC,
    "floor_bytes": row["floor_bytes"],
    "floor_us": 1e6 * row["floor_bytes"] / row["bandwidth"],
    "achieved_over_floor": row["achieved_floor"],
    "base_achieved_over_floor": row["base_achieved_floor"],
    "reads": row["reads"],
    "writes": row["writes"],
    "compiled_bytes_per_param": row["compiled_bytes_per_param"],
    "floor_bytes_per_param": row["floor_bytes_per_param"],
  }


# ------------------------------------------- whole train step (A-GEM vs GEM)


def _ce(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def _step_timer(tx, params, make_state, batch, calls, model="mlp"):
  """Times a whole train step (forward, backward, transform, apply); params and state donated.

  MLPs: ``batch`` examples of 784 inputs; the LMs: ``batch`` sequences of bytes.
  """
  if model.startswith("lm"):
    name = model.removesuffix("-bf16")
    loss, data = lm.lm_loss(name), (lm.lm_batch(batch, lm.lm_config(name)["length"]),)
  else:
    x = jax.random.normal(jax.random.key(3), (batch, params["layer0"]["kernel"].shape[0]))
    y = jax.random.randint(jax.random.key(4), (batch,), 0, 10)
    loss, data = _ce, (x, y)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p, *data), s, p)
    return optax.apply_updates(p, u), s

  def run():
    out = step(jax.tree.map(jnp.copy, params), make_state())
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


def plot_floor(rows, path):
  """Bar chart: achieved / floor per case, one group of bars per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in rows if r["case"] in floor.TRAFFIC]  # the others are bound by FLOPs
  models = list(dict.fromkeys(r["model"] for r in rows))
  cases = list(dict.fromkeys(r["case"] for r in rows))
  width = 0.8 / len(models)
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cases) * max(1, len(models) / 2)), 4))
  for i, m in enumerate(models):
    got = {r["case"]: r["achieved_over_floor"] for r in rows if r["model"] == m}
    xs = [j + i * width for j, c in enumerate(cases) if c in got]
    ax.bar(xs, [got[c] for c in cases if c in got], width, label=m)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(1.15, color="r", lw=0.8, ls="--", label="goal 1.15")
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=45, ha="right")
  ax.set_ylabel("update time / floor")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(c.name for c in CASES))
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--json", default=None, help="write the rows to this file")
  parser.add_argument("--png", default=None, help="bar chart of achieved / floor per case")
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
    f"{'case':<18}{'model':<13}{'base':<6}{'base us':>10}{'update us':>11}"
    f"{'time x':>8}{'state x':>9}{'GB/s':>6}{'floor us':>10}{'ach/floor':>10}{'base/floor':>11}"
    f"{'B/param':>8}{'floor':>6}" + (f"{'step x':>8}" if args.step_batch else "")
  )
  rows = []
  for model in args.models.split(","):
    big = lm.n_params(model_params(model)) >= BIG  # built for real: the LMs are cached
    for name in args.cases.split(","):
      if by_name[name].models and model not in by_name[name].models:
        continue
      if big and name not in floor.ELEMENTWISE:
        continue  # GEM / OGD hold k params-sized rows, K-FAC / GPM run on the MLPs
      repeats, calls = (min(args.repeats, 2), 1) if big else (args.repeats, args.calls)
      row = measure(by_name[name], model, repeats, calls, 0 if big else args.step_batch)
      rows.append(row)
      print(
        f"{row['case']:<18}{model:<13}{row['base']:<6}{row['base_update_us']:>10.1f}"
        f"{row['update_us']:>11.1f}{row['update_ratio']:>8.2f}"
        f"{row['state_bytes_ratio']:>9.2f}{row['bandwidth_gbs']:>6.1f}{row['floor_us']:>10.1f}"
        f"{row['achieved_over_floor']:>10.2f}{row['base_achieved_over_floor']:>11.2f}"
        f"{row['compiled_bytes_per_param']:>8.0f}{row['floor_bytes_per_param']:>6.0f}"
        + (f"{row['step_ratio']:>8.2f}" if "step_ratio" in row else "")
        + ("" if row["state_bytes_vs"] == "base" else " (state x of params)"),
        flush=True,
      )
  if args.png and any(r["case"] in floor.TRAFFIC for r in rows):
    plot_floor(rows, args.png)
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
