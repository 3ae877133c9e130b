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
import json
import platform

import jax

from benchmarks import floor, lm
from benchmarks.overhead_cases import BASES, BIG, CASES, MODELS, Case, model_params
from benchmarks.train_steps import measure_train_steps, step_timer


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
    step_base = step_timer(base, params, lambda: base.init(params), step_batch, calls, model)
    step_tx = step_timer(
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


def make_parser() -> argparse.ArgumentParser:
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
  return parser


def main():
  args = make_parser().parse_args()
  device = jax.devices()[0]
  print(
    f"device: {device.platform} ({device.device_kind}), {platform.processor() or ''}"
    f" jax {jax.__version__}, min over {args.repeats} repeats x {args.calls} calls,"
    " update + apply_updates with params and state donated"
    + (f", step x = train step at batch {args.step_batch}" if args.step_batch else "")
  )
  rows = case_rows(args)
  if args.png and any(r["case"] in floor.TRAFFIC for r in rows):
    plot_floor(rows, args.png)
  step_rows = train_step_rows(args) if args.steps else []
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": str(device), "rows": rows, "steps": step_rows}, f, indent=1)


def case_rows(args) -> list[dict]:
  """Measures and prints each case on each model (see :func:`measure`)."""
  by_name = {c.name: c for c in CASES}
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
  return rows


def train_step_rows(args) -> list[dict]:
  """Measures and prints the whole train step of SGD, A-GEM and GEM (``--steps`` models)."""
  print(
    f"\nwhole jitted train step (batch 10; A-GEM: + {256} memory samples; GEM: + 20 tasks x m"
    " memory samples, one vmapped backward)"
  )
  print(
    f"{'model':<9}{'m':>5}{'sgd us':>10}{'agem us':>10}{'gem us':>11}"
    f"{'agem/sgd':>10}{'gem/agem':>10}  projected"
  )
  step_rows = []
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
  return step_rows


if __name__ == "__main__":
  main()
