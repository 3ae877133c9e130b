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
from benchmarks.continual.mnist_streams import cap_stream
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


def make_parser() -> argparse.ArgumentParser:
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
  parser.add_argument("--n-train", type=int, default=None,
                      help="at most N training examples per task (a random subset)")  # fmt: skip
  parser.add_argument("--n-test", type=int, default=None,
                      help="at most N test examples per task (the first N)")  # fmt: skip
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
  return parser


def main(argv=None):
  args = make_parser().parse_args(argv)
  if args.from_jsonl:
    return report_jsonl(args.from_jsonl, args.out)
  if args.list:
    print_registered()
    return []
  preset = PRESETS[args.stream]
  args.scenario = args.scenario or preset.scenario or "domain"
  names = args.methods.split(",") if args.methods else list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
  cfg = make_config(args, preset)
  seeds = list(range(args.seed0, args.seed0 + args.seeds))
  dev = jax.devices()[0]
  sched = f"{cfg.iters} iters" if cfg.iters else f"{cfg.epochs} epoch(s)"
  print(
    f"{args.stream} ({args.scenario}-incremental where it applies): {preset.doc}\n"
    f"methods {names}, seeds {seeds}, {sched}/task, batch {cfg.batch_size}; JAX {jax.__version__} "
    f"on {dev.platform} ({os.cpu_count()} CPUs visible)",
    flush=True,
  )
  args.out.mkdir(parents=True, exist_ok=True)
  jsonl = args.out / "results.jsonl"
  with open(jsonl, "a" if args.resume else "w") as f:
    records = run_methods(names, args, preset, cfg, seeds, write_record(f, args, dev, argv))
  print("\n" + results_table(records))
  paths = save_plots(records, args.out)
  print(f"\nresults: {jsonl}\nplots:   " + "\n         ".join(str(p) for p in paths))
  return records


def report_jsonl(files, out: pathlib.Path) -> list[dict]:
  """``--from-jsonl``: the table and plots of earlier runs' records."""
  records = [json.loads(line) for f in files for line in open(f) if line.strip()]
  out.mkdir(parents=True, exist_ok=True)
  print(results_table(records))
  paths = save_plots(records, out)
  print("plots:   " + "\n         ".join(str(p) for p in paths))
  return records


def print_registered():
  """``--list``: the registered methods and the presets."""
  print("methods:")
  for m in METHODS.values():
    print(f"  {m.name:<12} {m.doc}")
  print("streams:")
  for n, p in PRESETS.items():
    print(f"  {n:<14} {p.doc}")


def make_config(args, preset) -> Config:
  """The run's `Config`: the preset's settings, overridden by the command line."""
  iters = args.iters if args.iters is not None else (preset.iters if args.epochs is None else None)
  epochs = None if iters is not None else (args.epochs or preset.epochs or 1)
  return Config(
    hidden=preset.hidden,
    optimizer=args.optimizer or preset.optimizer,
    lr=dict(preset.lr),
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


def write_record(f, args, dev, argv):
  """``write(record)``: adds the run's provenance and appends the record to ``f``."""

  def write(r):
    r.update(
      protocol=args.stream,
      device=f"{dev.platform} ({dev.device_kind})",
      machine=platform.machine(),
      jax=jax.__version__,
      command="python -m benchmarks.continual " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    f.write(json.dumps(r) + "\n")
    f.flush()

  return write


def run_methods(names, args, preset, cfg, seeds, write) -> list[dict]:
  """Runs each method over the seeds; prints a line per method; returns every record."""
  records = []
  heads = {}  # the model's forward passes per column layout, shared by the methods
  for name in names:
    recs = run_method(
      name, lambda s: cap_stream(preset.stream(args.data, args.scenario, s), args.n_train,
                                 args.n_test, s),
      cfg, seeds, on_record=write, heads=heads,
    )  # fmt: skip
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
  return records
