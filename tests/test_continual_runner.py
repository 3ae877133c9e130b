"""benchmarks.continual end to end on a tiny two-task stream."""

import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax
from benchmarks import continual
from benchmarks.continual import progress
from benchmarks.continual.methods import memory_projection
from cl_optax import streams

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


def _blobs(seed=0, n=48, d=6):
  """Four well-separated Gaussian classes in d dimensions."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (4, d))
  y = np.repeat(np.arange(4), n // 4)
  x = (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32)
  return x, y


def _tiny_preset(scenario="task"):
  def make(data, scenario, seed):
    x, y = _blobs(seed)
    return streams.split(x, y, classes_per_task=2, scenario=scenario, seed=seed)

  return continual.Preset("tiny blobs", make, (8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4,
                          epochs=2, scenario=scenario)  # fmt: skip


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setitem(continual.PRESETS, "tiny", _tiny_preset())
  return "tiny"


def test_end_to_end_writes_json_and_png(tiny, tmp_path, capsys):
  out = tmp_path / "run"
  records = continual.main(
    ["--stream", tiny, "--methods", "sgd,soft_mask,freeze", "--seeds", "2", "--out", str(out),
     "--no-progress"]
  )  # fmt: skip
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == 6 == len(records)
  for line in lines:
    r = json.loads(line)
    R = np.asarray(r["acc_matrix"])
    assert R.shape == (2, 2) and np.all((0 <= R) & (R <= 1))
    assert r["acc"] == pytest.approx(R[-1].mean())
    assert r["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
    assert r["fwt"] == pytest.approx(R[0, 1] - r["baseline"][1])
    assert r["samples"] == 2 * 2 * (int(0.8 * 12) * 2 // 4) * 4  # tasks x epochs x batches x B
    assert r["samples_per_s"] > 0 and r["wall_s"] > 0
    assert R[0, 0] > 0.75  # learns the first task (two separated blobs)
  assert {json.loads(x)["method"] for x in lines} == {"sgd", "soft_mask", "freeze"}
  for name in ("heatmaps.png", "acc_vs_forgetting.png", "acc_vs_speed.png", "avg_accuracy.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  printed = capsys.readouterr().out
  assert (
    "samples/s" in printed and "soft_mask" in printed and str(out / "avg_accuracy.png") in printed
  )


def test_seeds_reproducible_and_class_incremental(monkeypatch, tmp_path):
  monkeypatch.setitem(continual.PRESETS, "tiny-class", _tiny_preset("class"))
  argv = ["--stream", "tiny-class", "--methods", "adam", "--seeds", "1", "--no-progress"]
  a = continual.main(argv + ["--out", str(tmp_path / "a")])
  b = continual.main(argv + ["--out", str(tmp_path / "b")])
  np.testing.assert_array_equal(a[0]["acc_matrix"], b[0]["acc_matrix"])
  assert a[0]["scenario"] == "class"
  assert a[0]["fwt"] is None and a[0]["bwt"] is not None  # FWT: undefined in class-IL


class _CountingState(NamedTuple):
  projected: jax.Array
  seen_ref: jax.Array


def _agem_like():
  """Test-only transform: an A-GEM projection on a `ref_grads` extra arg."""

  def init(params):
    return _CountingState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, ref_grads=None, **extra):
    if ref_grads is None:
      return updates, state
    dot = optax.tree.vdot(updates, ref_grads)
    nn = optax.tree.vdot(ref_grads, ref_grads)
    coef = jnp.where(dot < 0, dot / jnp.maximum(nn, 1e-12), 0.0)
    new = jax.tree.map(lambda g, r: g - coef * r, updates, ref_grads)
    has_ref = nn > 0
    return new, _CountingState(
      state.projected + (dot < 0).astype(jnp.int32), state.seen_ref + has_ref.astype(jnp.int32)
    )

  return optax.GradientTransformationExtraArgs(init, update)


def _memory_init(a: continual.AuxInit):
  m = 8
  return {
    "x": jnp.zeros((m, *a.input_shape), jnp.float32),
    "y": jnp.zeros((m,), jnp.int32),
    "task": jnp.zeros((m,), jnp.int32),
    "full": jnp.zeros((), bool),
  }


def _memory_step(s: continual.Step):
  # the reference gradient on the memory, computed inside the same jitted step
  mem = s.aux
  g = jax.grad(s.loss_fn)(s.params, mem["x"], mem["y"], mem["task"])
  g = jax.tree.map(lambda v: jnp.where(mem["full"], v, 0.0), g)
  return {"ref_grads": g}, mem


def _memory_end(e: continual.TaskEnd):
  xs, ys = e.batches
  x = xs.reshape(-1, *xs.shape[2:])[:8]
  y = ys.reshape(-1)[:8]
  aux = {"x": x, "y": y, "task": jnp.full((8,), e.task, jnp.int32), "full": jnp.ones((), bool)}
  return e.opt_state, aux


def test_registry_hooks_carry_memory_and_extra_args(tiny, monkeypatch, tmp_path):
  """A method with a memory (aux), a per-step extra arg and an end-of-task hook."""
  method = continual.Method(
    "agem_like",
    lambda h: optax.chain(_agem_like(), h.base()),
    "test only",
    end_task=_memory_end,
    init_aux=_memory_init,
    step=_memory_step,
  )
  monkeypatch.setitem(continual.METHODS, "agem_like", method)
  cfg = continual.Config((8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=2, iters=None,
                         progress=False)  # fmt: skip
  make = functools.partial(_tiny_preset().stream, None, "task")
  (rec,) = continual.run_method("agem_like", make, cfg, [0], return_state=True)
  params, opt_state, aux = rec["final_state"]
  state = opt_state[0]
  steps_per_task = 2 * (int(0.8 * 12) * 2 // 4)
  assert int(state.seen_ref) == steps_per_task  # a reference gradient only on task 1
  assert 0 <= int(state.projected) <= steps_per_task
  assert np.asarray(rec["acc_matrix"]).shape == (2, 2)


def test_unknown_method_and_hp(tiny):
  with pytest.raises(SystemExit, match="unknown method"):
    continual.main(["--stream", tiny, "--methods", "nope", "--no-progress"])
  with pytest.raises(ValueError, match="already registered"):
    continual.register(continual.METHODS["sgd"])


def test_list(capsys):
  continual.main(["--list"])
  out = capsys.readouterr().out
  assert "soft_mask" in out and "pmnist-agem" in out


def test_progress_ticks_from_inside_the_scan(tiny, monkeypatch, tmp_path):
  counts = []

  class Bar:
    def __init__(self, total):
      self.total, self.n = total, 0

    def update(self, k):
      self.n += k

    def close(self):
      counts.append((self.n, self.total))

  monkeypatch.setattr(progress, "progress_bar", lambda desc, total: Bar(total))
  monkeypatch.setattr(progress, "on_terminal", lambda: True)  # bars only on a terminal
  continual.main(["--stream", tiny, "--methods", "sgd", "--seeds", "1", "--out", str(tmp_path)])
  steps = 2 * (int(0.8 * 12) * 2 // 4)
  assert counts == [(steps, steps)] * 2


def _register_tuned_freeze(monkeypatch, name, settings):
  """`freeze` registered again under `name` with `settings` ({preset: row}) added to the
  protocols' settings table; its CLI args."""
  method = continual.METHODS["freeze"]._replace(name=name)
  monkeypatch.setitem(continual.METHODS, name, method)
  for preset, row in settings.items():
    monkeypatch.setitem(continual.SETTINGS, (preset, name), row)
  return ["--methods", name, "--seeds", "1", "--no-progress"]


def test_protocol_settings_per_method(tiny, monkeypatch, tmp_path):
  protocol = {"tiny": {"lr": 0.05, "threshold": 0.5}}
  argv = ["--stream", tiny, *_register_tuned_freeze(monkeypatch, "freeze_tuned", protocol)]
  (r,) = continual.main(argv + ["--out", str(tmp_path / "a")])
  assert r["lr"] == 0.05 and r["hp"] == {"threshold": 0.5}
  (r,) = continual.main(
    argv + ["--out", str(tmp_path / "b"), "--lr", "0.2", "--hp", "threshold=0.7"]
  )
  assert r["lr"] == 0.2 and r["hp"] == {"threshold": 0.7}


def test_mlp_layer_inputs_match_the_forward_pass():
  params = continual.mlp_init(jax.random.key(0), (5, 7, 3), bias=False)
  x = jax.random.normal(jax.random.key(1), (4, 5))
  reps = continual.mlp_layer_inputs(params, x)
  np.testing.assert_allclose(reps["layer0"]["kernel"], x)
  h = np.maximum(np.asarray(x) @ np.asarray(params["layer0"]["kernel"]), 0)
  np.testing.assert_allclose(reps["head"]["kernel"], h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    continual.mlp_apply(params, x), h @ np.asarray(params["head"]["kernel"]), rtol=1e-5, atol=1e-5
  )
  assert "bias" not in params["head"]


def test_from_jsonl_replots(tiny, tmp_path, capsys):
  continual.main(["--stream", tiny, "--methods", "sgd", "--seeds", "1", "--no-progress",
                  "--out", str(tmp_path / "a")])  # fmt: skip
  recs = continual.main(["--from-jsonl", str(tmp_path / "a" / "results.jsonl"),
                         "--out", str(tmp_path / "b")])  # fmt: skip
  assert len(recs) == 1 and (tmp_path / "b" / "heatmaps.png").is_file()
  assert "sgd" in capsys.readouterr().out


# ------------------------------------------------- every registered method


def _run_tiny(name):
  """`name` on two tasks of the tiny stream (one epoch each, SGD lr 0.1): record, final params."""
  # fisher_every 2: ewc_agem_code's running Fisher flushes every 10 steps, more than a tiny task
  cfg = continual.Config((8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=1, iters=None,
                         hp={"fisher_every": 2}, progress=False, protocol="tiny",
                         scenario="task")  # fmt: skip
  make = functools.partial(_tiny_preset().stream, None, "task")
  (rec,) = continual.run_method(name, make, cfg, [0], return_state=True)
  return rec, rec.pop("final_state")[0]


@pytest.fixture(scope="module")
def sgd_params():
  return _run_tiny("sgd")[1]


@pytest.mark.parametrize("name", sorted(continual.METHODS))
def test_every_registered_method_runs_and_acts(name, sgd_params):
  """Each registry entry trains two tasks of the tiny stream (R finite, in [0, 1]) and ACTS:
  its final parameters differ from plain SGD's from the same initialisation and batches
  (a method whose transform, memory or consolidation did nothing would match SGD exactly);
  a method with its own model (HAT, WSN): they differ from that model's initial ones."""
  rec, params = _run_tiny(name)
  R = np.asarray(rec["acc_matrix"])
  assert R.shape == (2, 2)
  assert np.all(np.isfinite(R)) and np.all((0 <= R) & (R <= 1)), R
  assert np.isfinite(rec["acc"]) and rec["samples_per_s"] > 0
  if name == "sgd":
    return
  reference = sgd_params
  if continual.METHODS[name].model is not None:  # its own model (HAT, WSN, TRGP): vs its init
    model = continual.METHODS[name].model((8,), True, rec["hp"])
    _, k_init = jax.random.split(jax.random.key(0))  # the runner's init key of seed 0
    reference = model.init(k_init, (6,), 4)
  common = {k: params[k] for k in reference}  # TRGP's model adds leaves (trgp_q) to the MLP's
  gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), common, reference)
  diff = max(jax.tree.leaves(gaps))
  print(f"{name}: max |params - sgd params| = {diff:.3g}")
  assert diff > 1e-4, f"{name}: final parameters within {diff:.1e} of plain SGD's"  # A-GEM: 1e-3


def test_protocol_settings_per_scenario(tiny, monkeypatch, tmp_path):
  protocol = {"tiny": {"lr": 0.05, "threshold": 0.5}, "tiny/domain": {"threshold": 0.6}}
  argv = ["--stream", tiny, *_register_tuned_freeze(monkeypatch, "freeze_sc", protocol)]
  (r,) = continual.main(argv + ["--out", str(tmp_path / "a")])
  assert r["lr"] == 0.05 and r["hp"] == {"threshold": 0.5}
  (r,) = continual.main(argv + ["--out", str(tmp_path / "b"), "--scenario", "domain"])
  assert r["lr"] == 0.05 and r["hp"] == {"threshold": 0.6}


def _ring_with_task0(params, key, n=5):
  mem = memory_projection.ring_init(continual.AuxInit(3, (6,), {"memory_per_task": 8}, 6))
  x = jax.random.normal(key, (n, 6))
  y = jnp.arange(n, dtype=jnp.int32) % 2
  mem = cl_optax.replay.add(mem, {"x": x, "y": y, "task": jnp.zeros(n, jnp.int32)}, task=0)
  return mem, x, y


def _step(params, mem, task, hp):
  columns = jnp.asarray([[0, 1], [2, 3], [4, 5]], jnp.int32)
  valid = jnp.ones((3, 2), bool)

  def loss_fn(p, x, y, t, w=None):
    losses = continual.xent(continual.mlp_apply(p, x), columns[t], valid[t], y)
    return losses.mean() if w is None else jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

  x = jnp.ones((4, 6))
  y = jnp.zeros(4, jnp.int32)
  s = continual.Step(params, x, y, jnp.int32(task), 3, mem, jax.random.key(3), loss_fn, hp,
                     continual.mlp_apply, columns, valid)  # fmt: skip
  return s, loss_fn


def test_agem_and_gem_steps_read_the_past_tasks_memory():
  """A-GEM's g_ref and GEM's task_grads: gradients on exactly the stored past examples."""
  params = continual.mlp_init(jax.random.key(0), (6, 5, 6))
  mem, x0, y0 = _ring_with_task0(params, jax.random.key(1))
  want = jax.grad(
    lambda p: optax.softmax_cross_entropy_with_integer_labels(
      continual.mlp_apply(p, x0)[:, :2], y0
    ).mean()
  )(params)
  s, _ = _step(params, mem, 1, {"memory_batch": 16})
  extra, new_mem = jax.jit(lambda: memory_projection.agem_step(s))()
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
  jax.tree.map(chex_close, extra["ref_grads"], want)
  assert int(new_mem.written[1]) == 4 and int(new_mem.written[0]) == 5
  extra, _ = jax.jit(lambda: memory_projection.gem_step(s))()
  assert np.asarray(extra["task_mask"]).tolist() == [True, False, False]
  jax.tree.map(lambda g, w: chex_close(g[0], w), extra["task_grads"], want)
  jax.tree.map(lambda g: chex_close(g[1:], 0.0), extra["task_grads"])  # empty rings: 0
  s, _ = _step(params, mem, 0, {"memory_batch": 16})  # task 0: no past task, g_ref = 0
  extra, _ = jax.jit(lambda: memory_projection.agem_step(s))()
  jax.tree.map(lambda g: chex_close(g, 0.0), extra["ref_grads"])


def test_report_std_over_seeds_is_the_sample_std():
  """The tables' ``mean ± std`` uses Bessel's correction (numpy's ddof=1), 0 for one seed."""
  from benchmarks.continual import report

  accs = [0.3114, 0.3918, 0.3857, 0.4287, 0.3294]
  pct = np.asarray(accs) * 100
  assert report.fmt(accs) == f"{pct.mean():.2f} ± {np.std(pct, ddof=1):.2f}"
  assert report.fmt(accs) != f"{pct.mean():.2f} ± {np.std(pct):.2f}"
  assert report.fmt([0.5]) == "50.00 ± 0.00"
  assert report.fmt([None, None]) == "-"
  assert report.mean_std([None, 0.5, 0.7]) == (60.0, np.std([50.0, 70.0], ddof=1))
