"""Run in its own process with 8 host devices (see tests/test_sharded_training.py).

Trains ``examples/sharded_training.py``'s tiny configuration (every transform
in one chain: agem, ewc, adam, soft_mask; the replay memory split over
``data``) on one device and on a 4x2 (data, model) mesh, and checks: the loss
sequences agree to 1e-5, after every consolidate each state leaf shaped like
a parameter has that parameter's sharding, and the compiled optimiser update
holds no all-gather. Writes the 4x2 losses to ``argv[1]`` (JSON) for the
two-process comparison.
"""

import json
import pathlib
import sys

import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "examples"))
import sharded_training as example  # noqa: E402


def main():
  cfg = dict(example.TINY)
  domains = example.load_domains(cfg)
  one = example.train("all", cfg, example.make_mesh(1, 1), domains)
  print("1 device:", np.round(one, 6).tolist(), flush=True)

  checked, mismatches = [], []
  last = {}

  def on_consolidate(opt_state, params, tx):
    n, bad = example.sharding_mismatches(opt_state, params)
    checked.append(n)
    mismatches.extend(bad)
    last.update(tx=tx, opt_state=opt_state, params=params)

  mesh = example.make_mesh(4, 2)
  eight = example.train("all", cfg, mesh, domains, on_consolidate=on_consolidate)
  print("4x2 mesh:", np.round(eight, 6).tolist(), flush=True)
  np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)
  print("losses: ok")
  # adam mu and nu, ewc anchor and fisher, soft_mask importance: 5 per parameter.
  n_params = len(jax.tree.leaves(last["params"]))
  assert checked == [5 * n_params] * (cfg["domains"] - 1), (checked, n_params)
  assert not mismatches, "state leaves not sharded like their parameter:\n" + "\n".join(mismatches)
  print("state sharding: ok")
  hlo = example.update_hlo(last["tx"], last["opt_state"], last["params"], "all")
  assert "all-gather" not in hlo, "the compiled update gathers a sharded leaf"
  assert "all-reduce" in hlo  # agem's global dot products are reduced, not gathered
  print("update hlo: ok")
  if len(sys.argv) > 1:
    pathlib.Path(sys.argv[1]).write_text(json.dumps({"all": eight}))


if __name__ == "__main__":
  main()
