"""Restart bit for bit: stop halfway through task 3, restore in a new process, finish.

For every transform (and ``inject_hyperparams`` / ``MultiSteps`` around one),
``restart_program`` trains two tasks with ``consolidate`` and half of a third,
saves params, optimiser state, replay memory, PRNG key and step with orbax;
one new process restores all the cases and finishes them; the final params
and optimiser state must equal an uninterrupted run exactly (CPU).
"""

import pathlib
import subprocess
import sys

import chex
import jax
import pytest
import restart_program as prog
from subprocess_env import checkout_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
  root = tmp_path_factory.mktemp("restart")
  for name in prog.CASES:
    prog.checkpoint(root, name)
  script = pathlib.Path(prog.__file__)
  proc = subprocess.run(
    [sys.executable, str(script), str(root)],
    capture_output=True,
    text=True,
    timeout=600,
    env=checkout_env(),
  )
  return root, proc


@pytest.mark.parametrize("name", list(prog.CASES))
def test_restored_run_equals_uninterrupted_run_exactly(restarted, name):
  root, proc = restarted
  assert f"{name}: finished" in proc.stdout, proc.stdout + proc.stderr
  whole = prog.train(name, prog.init_run(name), prog.TASKS * prog.STEPS)
  want = {"params": whole["params"], "opt_state": whole["opt_state"]}
  got = prog.restore(prog.case_dir(root, name) / "final", want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  chex.assert_trees_all_equal(got, want)
  # The run really crossed two task boundaries and the checkpoint sat between them.
  assert prog.STEPS * 2 < prog.HALF < prog.STEPS * prog.TASKS
