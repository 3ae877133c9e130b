"""The NNX examples that `make demo` does not run: tiny end-to-end runs."""

import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
  "script, args",
  [
    ("flax_soft_mask", ["--methods", "adam,adam>soft_mask", "--seeds", "1", "--epochs", "1"]),
    ("flax_ewc", ["--n-train", "100", "--tasks", "2", "--seeds", "1"]),
    ("flax_ncl", ["--n-train", "100", "--tasks", "2", "--seeds", "1"]),
  ],
)
def test_example_runs_and_writes_its_plot(script, args, tmp_path, monkeypatch, capsys):
  monkeypatch.syspath_prepend(str(EXAMPLES))
  monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(tmp_path)])
  __import__(script).main()
  out = capsys.readouterr().out
  assert "accuracy" in out.lower()
  assert (tmp_path / "accuracy_matrices.png").stat().st_size > 0
