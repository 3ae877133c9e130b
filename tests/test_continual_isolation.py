"""The runner's hooks for parameter isolation: eval_view, Method.model, retrain, Step.index,
capacity; and the HAT / PackNet / WSN entries (old tasks re-measured with their views)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import continual
from cl_optax import streams

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


def _tiny_stream(seed, n=48, d=6):
  """Four well-separated Gaussian classes, two tasks of two classes (task-IL)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (4, d))
  y = np.repeat(np.arange(4), n // 4)
  x = (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32)
  return streams.split(x, y, classes_per_task=2, scenario="task", seed=seed)


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
