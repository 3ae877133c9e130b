"""Transforms shard like the parameters (8 host devices, in a subprocess)."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # multi-device runs in a subprocess


def test_states_and_updates_shard_like_params():
  script = pathlib.Path(__file__).parent / "multidevice" / "check_sharding.py"
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name in ("soft_mask", "freeze", "ewc", "si", "ncl_diag", "agem", "gem", "ogd"):
    assert f"{name}: ok" in proc.stdout, proc.stdout
