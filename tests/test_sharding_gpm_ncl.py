"""gpm and Kronecker ncl on 8 host devices (in a subprocess): what shards, what is replicated."""

import pathlib

import pytest
from subprocess_env import run_script

pytestmark = pytest.mark.slow  # multi-device runs in a subprocess


def test_gpm_and_kronecker_ncl_shard_or_replicate_as_documented():
  script = pathlib.Path(__file__).parent / "multidevice" / "check_sharding_gpm_ncl.py"
  proc = run_script(script, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "gathers the layer's gradient only" in proc.stdout, proc.stdout
  for name in ("gpm", "sgp", "nscl", "trgp", "ncl_kfac"):
    assert f"{name}: ok" in proc.stdout, proc.stdout
