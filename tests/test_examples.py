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


def _fashion_mnist() -> pathlib.Path | None:
  """The folder of fashion_mnist.npz: $CL_OPTAX_DATA, or the shared data next to the checkout."""
  import os

  folders = [
    os.environ.get("CL_OPTAX_DATA"),
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data",
  ]
  for folder in filter(None, folders):
    if (pathlib.Path(folder) / "fashion_mnist.npz").is_file():
      return pathlib.Path(folder)
  return None


@pytest.mark.slow
@pytest.mark.parametrize(
  "data, args, min_acc",
  [
    # measured (seed 0, CPU): DER++ ACC 0.81, fine-tune 0.19
    ("digits", ["--epochs", "3"], 0.6),
    # measured (seed 0, CPU): DER++ ACC 0.66, fine-tune 0.20
    ("fashion_mnist", [], 0.5),
  ],
)
def test_derpp_example_beats_fine_tuning_in_class_il(data, args, min_acc, monkeypatch, capsys):
  """DER++ (reservoir memory, logit replay, memory cross-entropy over the seen classes) keeps
  the old classes that plain fine-tuning forgets in class-IL split digits / Fashion-MNIST."""
  if data == "fashion_mnist":
    folder = _fashion_mnist()
    if folder is None:
      pytest.skip("fashion_mnist.npz not found ($CL_OPTAX_DATA or ../shared/data)")
    data = str(folder)
  monkeypatch.syspath_prepend(str(EXAMPLES))
  results = __import__("flax_derpp").main(["--data", data, "--small", "--seeds", "1", *args])
  out = capsys.readouterr().out
  assert "accuracy matrix" in out and "forgetting" in out
  from cl_optax import metrics

  derpp = metrics.average_accuracy(results["derpp"][0])
  finetune = metrics.average_accuracy(results["finetune"][0])
  assert derpp > min_acc and derpp > finetune + 0.25, (derpp, finetune)


@pytest.mark.slow
def test_isolation_example_packnet_and_wsn_forget_exactly_nothing(monkeypatch):
  """Task-IL split digits, old tasks re-measured with their own view of the network:
  PackNet (packnet_params) and WSN (stored masks) keep every old accuracy bit for bit."""
  import types

  import numpy as np

  from cl_optax import streams

  monkeypatch.syspath_prepend(str(EXAMPLES))
  iso = __import__("flax_isolation")
  data = streams.load_digits()
  groups = [(0, 1), (2, 3), (4, 5)]  # three tasks: two boundaries
  stream = streams.split(data.x_train, data.y_train, groups=groups, scenario="task", seed=0)
  args = types.SimpleNamespace(epochs=3, batch=32, hidden=32, lr=3e-3, keep=0.5)
  for kind in ("packnet", "wsn"):
    R, _, cap = iso.run(kind, stream, args, 0)
    for t in range(3):
      np.testing.assert_array_equal(R[t:, t], R[t, t])  # re-measured, unchanged
    assert np.all(np.diag(R) > 0.6), (kind, R)
    assert len(cap) == 3
