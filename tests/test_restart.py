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


def test_restored_runs_equal_uninterrupted_runs_exactly(tmp_path):
  # One test over every case: the cases share one checkpoint and one restoring
  # process, which a test per case would redo on each xdist worker.
  uninterrupted = prog.checkpoint_all(tmp_path)
  proc = run_script(pathlib.Path(prog.__file__), tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  restored = prog.restore(tmp_path / "final", uninterrupted)
  assert restored.keys() == {prog.key(n) for n in prog.CASES}
  for name in prog.CASES:
    want, got = uninterrupted[prog.key(name)], restored[prog.key(name)]
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    chex.assert_trees_all_equal(got, want, custom_message=name)
  # The runs crossed two task boundaries and the checkpoint sat in the third task.
  assert prog.STEPS * 2 < prog.HALF < prog.STEPS * prog.TASKS
