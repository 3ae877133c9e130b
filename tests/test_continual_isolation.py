"""The runner's hooks for parameter isolation: eval_view, Method.model, retrain, Step.index,
capacity; and the HAT / PackNet / WSN entries (old tasks re-measured with their views)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import continual
from cl_optax import streams

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


def _gaussian_stream(seed, *, n, d, classes, spread, noise):
  """``classes`` Gaussian classes, tasks of two classes each (task-IL)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, spread, (classes, d))
  y = np.repeat(np.arange(classes), n // classes)
  x = (centres[y] + rng.normal(0, noise, (n, d))).astype(np.float32)
  return streams.split(x, y, classes_per_task=2, scenario="task", seed=seed)


def _tiny_stream(seed):
  """Four well-separated classes, two tasks."""
  return _gaussian_stream(seed, n=48, d=6, classes=4, spread=3, noise=0.5)


def _cfg(**kw):
  return continual.Config((8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=2, iters=None,
                          progress=False, **kw)  # fmt: skip


def _probe_step(s: continual.Step):
  aux = {"steps": s.aux["steps"] + 1, "top": jnp.maximum(s.aux["top"], s.epoch_index()),
         "per_epoch": jnp.asarray(s.epoch_steps, jnp.int32) + 0 * s.aux["per_epoch"]}  # fmt: skip
  return {}, aux


def _probe_finish(e: continual.TaskEnd):
  return e.retrain(e.params, e.opt_state, e.aux, 3)  # three more epochs of this task


def _zero_view(params, opt_state, aux, d):
  """Task 1 is evaluated with every parameter 0 (all logits tie: class 0 predicted)."""
  return jax.tree.map(lambda p: p * 0.0, params) if d == 1 else params


def test_hooks_eval_view_model_retrain_index_capacity(monkeypatch):
  method = continual.Method(
    "probe", lambda h: h.base(), "test only",
    init_aux=lambda a: {"steps": jnp.int32(0), "top": jnp.int32(0), "per_epoch": jnp.int32(0)},
    step=_probe_step, finish_task=_probe_finish, eval_view=_zero_view,
    model=lambda hidden, bias, hp: continual.MLP((16,), bias),
    capacity=lambda p, o, a, n: [0.25] * n,
  )  # fmt: skip
  monkeypatch.setitem(continual.METHODS, "probe", method)
  (rec,) = continual.run_method("probe", _tiny_stream, _cfg(), [0], return_state=True)
  params, _, aux = rec.pop("final_state")
  assert params["layer0"]["kernel"].shape == (6, 16)  # the method's model, not the preset's (8,)
  stream = _tiny_stream(0)
  per_epoch = stream[0].n_train // 4
  # two tasks x (2 epochs of training + 3 of retraining), every step through the method's hooks
  assert int(aux["steps"]) == 2 * 5 * per_epoch
  assert int(aux["per_epoch"]) == per_epoch and int(aux["top"]) == per_epoch - 1
  assert rec["samples"] == 2 * 5 * per_epoch * 4
  R = np.asarray(rec["acc_matrix"])
  chance = float(np.mean(stream[1].test()[1] == 0))  # zero logits: argmax is column 0
  assert R[0, 1] == R[1, 1] == rec["baseline"][1] == pytest.approx(chance)
  assert R[0, 0] > 0.75  # task 0 evaluated with the live parameters (it learns)
  assert rec["capacity"] == [0.25, 0.25]


def test_own_model_refuses_another_model(monkeypatch):
  method = continual.Method("probe2", lambda h: h.base(), model=lambda *a: continual.MLP((3,)))
  monkeypatch.setitem(continual.METHODS, "probe2", method)
  with pytest.raises(ValueError, match="trains its own model"):
    continual.run_method("probe2", _tiny_stream, _cfg(model="cnn"), [0])


def _overlapping_stream(seed):
  """Six overlapping classes, three tasks: plain Adam forgets."""
  return _gaussian_stream(seed, n=180, d=8, classes=6, spread=1.0, noise=1.0)


_ADAM = continual.Config((16,), "adam", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=3, iters=None,
                         progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def isolation_runs():
  out = {}
  for name in ("adam", "packnet", "wsn", "hat"):
    (rec,) = continual.run_method(name, _overlapping_stream, _ADAM, [0], return_state=True)
    out[name] = rec
  return out


def test_packnet_and_wsn_old_tasks_re_measured_show_exactly_zero_forgetting(isolation_runs):
  """Every old task is evaluated again after each later task, on its own view (PackNet's
  packnet_params, WSN's stored mask); with Adam, frozen weights and a fresh base state per
  task its accuracy is exactly the one measured right after it was trained."""
  R_adam = np.asarray(isolation_runs["adam"]["acc_matrix"])
  assert isolation_runs["adam"]["forgetting"] > 0  # the stream does make plain Adam forget
  for name in ("packnet", "wsn"):
    rec = isolation_runs[name]
    R = np.asarray(rec["acc_matrix"])
    for d in range(3):
      assert np.all(R[d:, d] == R[d, d]), (name, R)
    assert rec["forgetting"] == 0.0 and np.all(np.diag(R) > 0.5)
    assert not np.array_equal(R, R_adam)
  own = isolation_runs["packnet"]["capacity"]  # the equal share: 1/3 each (ties aside)
  assert np.allclose(own, 1 / 3, atol=0.02) and sum(own) <= 1.0
  assert np.allclose(isolation_runs["wsn"]["capacity"], 0.5, atol=0.01)  # c = 0.5


def _accuracy(model, params, x, y, cols):
  logits = model.apply(params, jnp.asarray(x.reshape(len(x), -1), jnp.float32))
  return float(np.mean(np.argmax(np.asarray(logits)[:, cols], -1) == y))


def test_views_re_measure_each_task_with_its_own_part(isolation_runs):
  """R[-1, d] is the final model evaluated through task d's view, computed here from the
  final state: PackNet theta * [0 < owner <= d+1]; WSN the kernels under task d's stored
  mask (masks differ per task); HAT the gates of task d at s_max."""
  stream = _overlapping_stream(0)
  for name in ("packnet", "wsn", "hat"):
    rec, method = isolation_runs[name], continual.METHODS[name]
    params, opt_state, aux = rec["final_state"]
    model = continual.runner._Run(name, _ADAM, {}).model
    model.init(jax.random.key(0), (8,), stream.n_outputs)
    for d in range(3):
      x, y = stream[d].test()
      view = method.eval_view(params, opt_state, aux, d)
      assert _accuracy(model, view, x, y, stream.columns[d]) == rec["acc_matrix"][-1][d]
  _, _, masks = isolation_runs["wsn"]["final_state"]
  m0, m1 = masks.mask(0)["layer0"]["kernel"], masks.mask(1)["layer0"]["kernel"]
  assert not np.array_equal(m0, m1)
  params = isolation_runs["hat"]["final_state"][0]
  hat_model = continual.runner._Run("hat", _ADAM, {}).model
  hat_model.init(jax.random.key(0), (8,), stream.n_outputs)
  x = jnp.asarray(stream[1].test()[0], jnp.float32)
  view = continual.METHODS["hat"].eval_view(params, None, None, 1)
  want, _ = hat_model.forward(params, x, task=1, s=400.0)
  np.testing.assert_array_equal(hat_model.apply(view, x), want)
  R = np.asarray(isolation_runs["hat"]["acc_matrix"])
  assert max(R[d, d] - R[-1, d] for d in range(3)) <= 0.1  # near-binary gates: ~0 forgetting
