"""The environment for tests that run a script in a new process."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def checkout_env(**extra) -> dict:
  """``os.environ`` with this checkout first on ``PYTHONPATH``, so a script run in a new
  process imports this checkout's ``cl_optax``, not whichever one is installed."""
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path, **extra}


def run_script(script, *args, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs ``python script *args`` in a new process of this checkout (bounded time)."""
  cmd = [sys.executable, str(script), *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=checkout_env())
