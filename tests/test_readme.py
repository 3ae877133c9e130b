"""The README's quick start, executed verbatim: it must run and learn."""

import contextlib
import io
import logging
import pathlib
import re

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
  """The first ```python block under the "## Quick start" heading, as written."""
  text = README.read_text()
  section = text[text.index("\n## Quick start") :]
  section = section[: section.find("\n## ", 1)]  # up to the next heading
  match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
  assert match, "README.md: no ```python block under '## Quick start'"
  return match.group(1)


@pytest.mark.slow
def test_quick_start_runs_and_learns(caplog):
  namespace = {"__name__": "__readme__"}
  out = io.StringIO()
  with jax.log_compiles(), caplog.at_level(logging.WARNING), contextlib.redirect_stdout(out):
    exec(compile(quick_start(), str(README), "exec"), namespace)

  acc = namespace["acc"]
  assert acc.shape == (5, 5)  # five two-class tasks of split digits
  assert np.all(np.diag(acc) > 0.85), acc  # every task is learnt (chance is 0.5)
  assert acc[-1].mean() > 0.85, acc  # and kept after the last task
  assert re.search(r"accuracy \d+\.\d %, forgetting -?\d+\.\d %", out.getvalue()), out.getvalue()
  # The README says one compiled step serves every task (`task` is an array, and
  # `consolidate` keeps the state's shapes and dtypes).
  compiled = re.compile(r"Finished .*compilation of .*train_step")
  compiles = [r.getMessage() for r in caplog.records if compiled.search(r.getMessage())]
  assert len(compiles) == 1, compiles
