"""Online permuted MNIST, width 100 (Dohare et al., 2024): BP, Adam, L2, S&P, CBP, ReDo, L2 Init.

784 -> 100 -> 100 -> 100 -> 10 ReLU, batch 1, 60 000 examples per task, online
accuracy (prediction before the update) per task; health measures on 1000
examples of the current task after each task.

  python -m benchmarks.plasticity.pmnist --tasks 150 --out benchmarks/figures/plasticity/pmnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.plasticity.common import run_method
from cl_optax import streams

SPECS = {
  "bp": {"method": "bp", "lr": 0.003},
  "adam": {"method": "adam", "lr": 1e-4},
  "l2": {"method": "l2", "lr": 0.003, "wd": 1e-4},
  "snp": {"method": "snp", "lr": 0.003, "wd": 1e-4, "sigma": 1e-5},
  "cbp": {"method": "cbp", "lr": 0.003, "rho": 1e-5, "mt": 100},
  "redo": {"method": "redo", "lr": 0.003, "tau": 0.01, "every": 1000, "stats_batch": 256},
  "l2init": {"method": "l2init", "lr": 0.003, "strength": 5e-5},
}
SIZES = (784, 100, 100, 100, 10)


def load(path):
  d = np.load(path)
  return jnp.asarray(d["x_train"].reshape(len(d["x_train"]), -1) / 255.0, jnp.float32), jnp.asarray(
    d["y_train"], jnp.int32
  )


def draw(problem, cursor):
  cursor, x, y, _ = problem.take(cursor, 1)  # each bin is one task: start_task at its start
  return cursor, x, y


def score(out, y):
  return (jnp.argmax(out, -1) == y).astype(jnp.float32)


def probe(problem, cursor, key):
  """1000 training images of the current task (its composed permutation)."""
  idx = jax.random.randint(key, (1000,), 0, problem.images.shape[0])
  return problem.images[idx][:, cursor.perm_pixels]


def problem(x, y, per_task, sizes=SIZES):
  """The :func:`make_run` arguments of online permuted MNIST (one bin = one task)."""
  return {
    "sizes": sizes,
    "make_problem": lambda seed: streams.online_permuted(
      x, y, examples_per_task=per_task, seed=seed
    ),
    "draw": draw,
    "score": score,
    "probe": probe,
    "start": lambda problem, cursor: problem.start_task(cursor),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--methods", default=",".join(SPECS))
  ap.add_argument("--tasks", type=int, default=150)
  ap.add_argument("--per-task", type=int, default=60_000)
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--chunk", type=int, default=5, help="tasks per jitted call")
  data = os.environ.get("CL_OPTAX_DATA", "/work/shared/data")
  ap.add_argument("--data", default=data + "/mnist.npz")
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  x, y = load(a.data)
  seeds = [int(s) for s in a.seeds.split(",")]
  results = {}
  for name in a.methods.split(","):
    spec = {"name": name, **SPECS[name]}
    results[name] = run_method(
      spec,
      problem(x, y, a.per_task),
      a.per_task,
      a.tasks,
      seeds,
      a.chunk,
      lambda m: print(m, file=sys.stderr, flush=True),
      vmap_runs=False,
    )
    meta = {"tasks": a.tasks, "per_task": a.per_task, "seeds": seeds}
    with open(a.out, "w") as f:
      json.dump({"meta": meta, "results": results}, f)


if __name__ == "__main__":
  main()
