"""The runner survives: --resume continues a stopped run; a diverging method is recorded."""

import json

import numpy as np
import pytest

from benchmarks import continual
from benchmarks.continual.resilience import stability_note
from cl_optax import streams

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


TIMING = {"train_s", "samples_per_s", "compile_s", "end_task_s", "wall_s", "command"}


def _blobs(seed=0, n=48, d=6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (4, d))
  y = np.repeat(np.arange(4), n // 4)
  return (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32), y


@pytest.fixture
def tiny(monkeypatch):
  def make(data, scenario, seed):
    x, y = _blobs(seed)
    return streams.split(x, y, classes_per_task=2, scenario=scenario, seed=seed)

  preset = continual.Preset(
    "tiny blobs", make, (8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=2, scenario="task"
  )
  monkeypatch.setitem(continual.PRESETS, "tiny", preset)
  return ["--stream", "tiny", "--seeds", "1", "--no-progress"]


def _lines(path):
  return [json.loads(x) for x in path.read_text().splitlines()]


def _without_timing(r):
  return {k: v for k, v in r.items() if k not in TIMING}


def test_resume_after_the_first_task_writes_the_same_results_line(tiny, tmp_path):
  args = tiny + ["--methods", "ewc"]
  continual.main(args + ["--out", str(tmp_path / "whole")])
  ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
  stopped = continual.main(args + ["--out", str(out), "--resume", str(ckpt)] + [
    "--stop-after-task", "1"])  # fmt: skip
  assert stopped == [] and (ckpt / "ewc" / "seed0" / "task0" / "meta.json").exists()
  assert not (out / "results.jsonl").read_text().strip()  # nothing written for a stopped seed
  continual.main(args + ["--out", str(out), "--resume", str(ckpt)])
  (whole,), (resumed,) = _lines(tmp_path / "whole" / "results.jsonl"), _lines(out / "results.jsonl")
  assert _without_timing(resumed) == _without_timing(whole)


def test_a_diverging_method_is_recorded_and_the_run_goes_on(tiny, tmp_path, capsys):
  out = tmp_path / "run"
  records = continual.main(
    tiny + ["--methods", "ewc,sgd", "--hp", "strength=1e30", "--out", str(out)]
  )
  lines = _lines(out / "results.jsonl")
  assert [r["method"] for r in lines] == ["ewc", "sgd"] == [r["method"] for r in records]
  ewc, sgd = lines
  assert ewc["diverged"]["task"] == 1 and ewc["acc"] is None
  assert "non-finite training loss on task 1" in ewc["diverged"]["reason"]
  assert "lower strength below" in ewc["diverged"]["reason"]
  assert "diverged" not in sgd and sgd["acc"] > 0.5
  printed = capsys.readouterr()
  assert "ewc: diverged" in printed.out and "diverged on task 1" in printed.out
  assert "lower strength below" in printed.err  # warned at the consolidate, before the step


def test_stability_note_names_the_bound():
  import jax.numpy as jnp
  import optax

  import cl_optax

  p = {"w": jnp.ones(3)}
  state = cl_optax.consolidate(
    optax.chain(cl_optax.ewc(10.0), optax.sgd(0.1)).init(p), p, importance={"w": jnp.full(3, 4.0)}
  )
  note = stability_note(state, "sgd", 0.1, {"strength": 10.0})  # 0.1 * 10 * 4 = 4 >= 2
  assert "= 4 >= 2" in note and "strength below 5" in note and "lr below 0.05" in note
  assert stability_note(state, "sgd", 0.01, {"strength": 10.0}) is None  # 0.4 < 2
  assert stability_note(state, "adam", 0.1, {"strength": 10.0}) is None  # not plain SGD
  # stable now (0.1 * 2 * 4 = 0.8), but summed over 4 tasks' importance: 0.1 * 2 * 16 = 3.2
  later = stability_note(state, "sgd", 0.1, {"strength": 2.0}, tasks_done=1, n_tasks=5)
  assert "= 0.8 < 2 after 1 task(s)" in later and "about 16 " in later, later
  assert "strength below 1.25 " in later and "lr below 0.0625" in later, later
  assert stability_note(state, "sgd", 0.1, {"strength": 2.0}, tasks_done=1, n_tasks=2) is None
  assert stability_note(state, "sgd", 0.1, {"strength": 2.0}, tasks_done=2, n_tasks=3) is None
