"""Update time and state bytes of each cl_optax transform vs its base optimiser.

Every number is a ratio to the plain base optimiser measured in the same run
(same process, same model, interleaved repeats, minimum over repeats), so it
says what a transform adds, not how fast this machine is. "update" is the
optimiser's share of a train step: ``update`` + ``apply_updates`` on fixed
gradients, jitted with params and state donated.

  python -m benchmarks.overhead                       # every case, both models
  python -m benchmarks.overhead --cases soft_mask --models mlp --json out.json

Add a transform by appending a `Case` to `benchmarks.overhead_cases.CASES`.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks import floor, lm
from benchmarks.continual.model import mlp_apply
from benchmarks.overhead_cases import BASES, BIG, CASES, MODELS, Case, mlp_params, model_params


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
  # A-GEM's step needs the reference gradient's extra backward pass: its update
  # part is what the goal names, so it has no step row here
  if step_batch and case.extra_args is Case._field_defaults["extra_args"]:
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
      row = measure(by_name[name], model, repeats, calls, args.step_batch)
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
