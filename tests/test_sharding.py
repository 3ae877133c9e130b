"""Transforms shard like the parameters (8 host devices, in a subprocess)."""

import pathlib

import pytest
from subprocess_env import run_script

pytestmark = pytest.mark.slow  # multi-device runs in a subprocess


def test_states_and_updates_shard_like_params():
  script = pathlib.Path(__file__).parent / "multidevice" / "check_sharding.py"
  proc = run_script(script, timeout=300)  # this checkout's cl_optax, not the installed one
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name in ("soft_mask", "freeze", "ewc", "si", "rwalk", "ncl_diag", "agem", "gem", "ogd"):
    assert f"{name}: ok" in proc.stdout, proc.stdout


def test_class_balanced_memory_shards_over_data():
  script = pathlib.Path(__file__).parent / "multidevice" / "check_class_balanced_sharding.py"
  proc = run_script(script, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for kind in ("Auto", "Explicit"):
    for what in ("add_balanced greedy", "sample greedy", "add_balanced cbrs", "sample cbrs"):
      assert f"{kind} {what}: ok" in proc.stdout, proc.stdout
