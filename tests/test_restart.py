"""Restart bit for bit: stop halfway through task 3, restore in a new process, finish.

For every transform (and ``inject_hyperparams`` / ``MultiSteps`` around one),
``restart_program`` trains two tasks with ``consolidate`` and half of a third,
saves params, optimiser state, replay memory, PRNG key and step with orbax;
one new process restores all the cases and finishes them; the final params
and optimiser state must equal an uninterrupted run exactly (CPU).
"""

import pathlib

import chex
import jax
import pytest
import restart_program as prog
from subprocess_env import run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
  """Every case checkpointed here, finished in one new process; its final runs."""
  root = tmp_path_factory.mktemp("restart")
  prog.checkpoint_all(root)
  script = pathlib.Path(prog.__file__)
  proc = run_script(script, root)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  whole = {
    prog.key(n): _final(prog.train(n, prog.init_run(n), prog.TASKS * prog.STEPS))
    for n in prog.CASES
  }
  return whole, prog.restore(root / "final", whole)


def _final(run):
  return {"params": run["params"], "opt_state": run["opt_state"]}


@pytest.mark.parametrize("name", list(prog.CASES))
def test_restored_run_equals_uninterrupted_run_exactly(restarted, name):
  whole, restored = restarted
  want, got = whole[prog.key(name)], restored[prog.key(name)]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  chex.assert_trees_all_equal(got, want)
  # The run crossed two task boundaries and the checkpoint sat in the third task.
  assert prog.STEPS * 2 < prog.HALF < prog.STEPS * prog.TASKS
