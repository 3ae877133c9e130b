"""Slowly-changing regression (Dohare et al., 2024): BP at three step sizes, linear, the fixes.

20 -> 5 -> 1 ReLU, SGD, batch 1, MSE; error per bin of 2T = 20 000 examples.

  python -m benchmarks.plasticity.regression --runs 30 --steps 1000000 \
    --out benchmarks/figures/plasticity/regression.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.plasticity.common import run_method
from cl_optax import streams

SPECS = {
  "bp_0.01": {"method": "bp", "lr": 0.01},
  "bp_0.003": {"method": "bp", "lr": 0.003},
  "bp_0.001": {"method": "bp", "lr": 0.001},
  "linear_0.01": {"method": "linear", "lr": 0.01},
  "l2": {"method": "l2", "lr": 0.01, "wd": 1e-3},
  "snp": {"method": "snp", "lr": 0.01, "wd": 1e-2, "sigma": 1e-3},
  "cbp": {"method": "cbp", "lr": 0.01, "rho": 1e-4, "mt": 10},
  "redo": {"method": "redo", "lr": 0.01, "tau": 0.01, "every": 1000, "stats_batch": 256},
  "l2init": {"method": "l2init", "lr": 0.01, "strength": 5e-4},
}
FLIP_AFTER = 10_000
PER_BIN = 2 * FLIP_AFTER


def _problem(flip_one):
  return lambda seed: streams.slowly_changing_regression(seed=seed, flip_one=flip_one)


def _draw(problem, cursor):
  return problem.next(cursor, 1)


def _score(out, y):
  return (out[:, 0] - y) ** 2


def _probe(problem, cursor, key):
  """256 inputs at the current slow bits (fresh fast bits)."""
  fast = jax.random.bernoulli(key, 0.5, (256, problem.n_inputs - problem.n_slow))
  slow = jnp.broadcast_to(cursor.reg_slow_bits, (256, problem.n_slow))
  return jnp.concatenate([slow, fast.astype(jnp.float32)], axis=1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--methods", default=",".join(SPECS))
  ap.add_argument("--runs", type=int, default=30)
  ap.add_argument("--steps", type=int, default=1_000_000)
  ap.add_argument("--flip-one", action="store_true", help="the Nature variant (one bit flips)")
  ap.add_argument("--chunk", type=int, default=10, help="bins per jitted call")
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  results = {}
  for name in a.methods.split(","):
    spec = {"name": name, **SPECS[name]}
    problem = {
      "sizes": (20, 1) if spec["method"] == "linear" else (20, 5, 1),
      "make_problem": _problem(a.flip_one),
      "draw": _draw,
      "score": _score,
      "probe": _probe,
    }
    results[name] = run_method(
      spec,
      problem,
      PER_BIN,
      a.steps // PER_BIN,
      list(range(a.runs)),
      a.chunk,
      lambda m: print(m, file=sys.stderr, flush=True),
    )
    meta = {"steps": a.steps, "runs": a.runs, "flip_one": a.flip_one, "per_bin": PER_BIN}
    with open(a.out, "w") as f:
      json.dump({"meta": meta, "results": results}, f)


if __name__ == "__main__":
  main()
