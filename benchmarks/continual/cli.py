"""The command line of `python -m benchmarks.continual` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import jax
import numpy as np

import benchmarks.continual.methods  # noqa: F401  registers every method
from benchmarks.continual.model import INITS
from benchmarks.continual.nnx_models import MODELS
from benchmarks.continual.protocols import PRESETS
from benchmarks.continual.registry import BASES, METHODS
from benchmarks.continual.report import fmt, results_table, save_plots
from benchmarks.continual.runner import Config, run_method
from cl_optax import streams

DESCRIPTION = "Continual-learning benchmark: a stream x methods -> accuracy matrices, table, plots."


def parse_hp(items):
  hp = {}
  for item in items or []:
    k, _, v = item.partition("=")
    if not _:
      raise SystemExit(f"--hp expects name=value; got {item!r}")
    try:
      hp[k] = json.loads(v)
    except json.JSONDecodeError:
      hp[k] = v
  return hp


def main(argv=None):
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  parser.add_argument("--stream", default="split-digits", choices=sorted(PRESETS))
  parser.add_argument("--scenario", default=None, choices=streams.SCENARIOS,
                      help="scenario of split streams (default: the preset's)")  # fmt: skip
  parser.add_argument("--methods", default=None, help="comma list (default: every registered)")
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
  parser.add_argument("--seed0", type=int, default=0, help="first seed")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--iters", type=int, default=None, help="iterations per task")
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--lr", type=float, default=None, help="override the preset's lr")
  parser.add_argument("--optimizer", default=None, choices=sorted(BASES))
  parser.add_argument("--hp", action="append", help="method hyper-parameter name=value")
  parser.add_argument(
    "--init", default=None, choices=INITS, help="parameter init (default: the preset's)"
  )
  parser.add_argument(
    "--data", default=None, help=f"MNIST .npz or folder (default ${streams.ENV_VAR})"
  )
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/continual"))
  parser.add_argument("--model", default="mlp", choices=sorted(MODELS),
                      help="mlp: the preset's MLP; cnn: a small Flax NNX CNN")  # fmt: skip
  parser.add_argument(
    "--no-progress",
    action="store_true",
    help="none (default: tqdm on a terminal, else a line per task)",
  )
  parser.add_argument(
    "--resume",
    type=pathlib.Path,
    default=None,
    help="checkpoint every task under DIR; a run stopped after task k continues from there",
  )
  parser.add_argument("--stop-after-task", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--list", action="store_true", help="list methods and streams")
  parser.add_argument(
    "--from-jsonl",
    type=pathlib.Path,
    nargs="+",
    default=None,
    help="no training: print the table and plot these results.jsonl files",
  )
  args = parser.parse_args(argv)

  if args.from_jsonl:
    records = [json.loads(line) for f in args.from_jsonl for line in open(f) if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    print(results_table(records))
    paths = save_plots(records, args.out)
    print("plots:   " + "\n         ".join(str(p) for p in paths))
    return records

  if args.list:
    print("methods:")
    for m in METHODS.values():
      print(f"  {m.name:<12} {m.doc}")
    print("streams:")
    for n, p in PRESETS.items():
      print(f"  {n:<14} {p.doc}")
    return []
  preset = PRESETS[args.stream]
  args.scenario = args.scenario or preset.scenario or "domain"
  names = args.methods.split(",") if args.methods else list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
  lr = dict(preset.lr)
  iters = args.iters if args.iters is not None else (preset.iters if args.epochs is None else None)
  epochs = None if iters is not None else (args.epochs or preset.epochs or 1)
  cfg = Config(
    hidden=preset.hidden,
    optimizer=args.optimizer or preset.optimizer,
    lr=lr,
    batch_size=args.batch_size or preset.batch_size,
    epochs=epochs,
    iters=iters,
    bias=preset.bias,
    hp=parse_hp(args.hp),
    progress=not args.no_progress,
    protocol=args.stream,
    lr_override=args.lr,
    scenario=args.scenario,
    init=args.init or preset.init,
    model=args.model,
    resume=None if args.resume is None else str(args.resume),
    stop_after=args.stop_after_task,
  )
  seeds = list(range(args.seed0, args.seed0 + args.seeds))
  dev = jax.devices()[0]
  sched = f"{iters} iters" if iters else f"{epochs} epoch(s)"
  print(
    f"{args.stream} ({args.scenario}-incremental where it applies): {preset.doc}\n"
    f"methods {names}, seeds {seeds}, {sched}/task, batch {cfg.batch_size}; JAX {jax.__version__} "
    f"on {dev.platform} ({os.cpu_count()} CPUs visible)",
    flush=True,
  )
  args.out.mkdir(parents=True, exist_ok=True)
  records = []
  heads = {}  # the model's forward passes per column layout, shared by the methods
  jsonl = args.out / "results.jsonl"
  with open(jsonl, "a" if args.resume else "w") as f:
    for name in names:

      def write(r):
        r.update(
          protocol=args.stream,
          device=f"{dev.platform} ({dev.device_kind})",
          machine=platform.machine(),
          jax=jax.__version__,
          command="python -m benchmarks.continual "
          + " ".join(sys.argv[1:] if argv is None else argv),
        )
        f.write(json.dumps(r) + "\n")
        f.flush()

      recs = run_method(
        name, lambda s: preset.stream(args, s), cfg, seeds, on_record=write, heads=heads
      )
      records += recs
      for r in recs:
        if r.get("diverged"):
          print(f"  {name}: diverged: {r['diverged']['reason']}", flush=True)
      if not recs:
        continue
      print(
        f"  {name}: ACC {fmt([r['acc'] for r in recs])} %, "
        f"{np.mean([r['samples_per_s'] for r in recs]):.0f} samples/s, "
        f"{np.mean([r['wall_s'] for r in recs]):.1f} s/seed",
        flush=True,
      )
  print("\n" + results_table(records))
  paths = save_plots(records, args.out)
  print(f"\nresults: {jsonl}\nplots:   " + "\n         ".join(str(p) for p in paths))
  return records
