"""The environment for tests that run a script in a new process."""

import os
import pathlib

ROOT = pathlib.Path(__file__).parents[1]


def checkout_env(**extra) -> dict:
  """``os.environ`` with this checkout first on ``PYTHONPATH``, so a script run in a new
  process imports this checkout's ``cl_optax``, not whichever one is installed."""
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path, **extra}
