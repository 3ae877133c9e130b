"""The runner's TRGP entry: the trust region chosen at a task's first step, each task's Q trained
only during that task, old tasks evaluated through their own view (eval_view)."""

import functools

import numpy as np
import pytest
from test_continual_runner import _tiny_preset

from benchmarks import continual

pytestmark = pytest.mark.slow  # an end-to-end run of the benchmark runner


def test_trgp_entry_selects_trains_its_q_and_keeps_old_q():
  hp = {"thresholds": [0.9999], "width": 4, "max_tasks": 2, "project_head": True}
  cfg = continual.Config((8,), "sgd", {"sgd": 0.1, "adam": 1e-2}, 4, epochs=2, iters=None,
                         hp=hp, progress=False, protocol="tiny", scenario="task")  # fmt: skip
  make = functools.partial(_tiny_preset().stream, None, "task")
  (rec,) = continual.run_method("trgp", make, cfg, [0], return_state=True)
  params, _, aux = rec.pop("final_state")
  R = np.asarray(rec["acc_matrix"])
  assert R[1, 0] >= R[0, 0] - 0.05  # task 0 kept (its view: W itself, projected updates)
  for k in ("layer0", "head"):
    assert bool(np.asarray(aux["active"][k])[1].any()), k  # task 1 scales task 0's subspace
    q = np.asarray(params["trgp_q"][k])
    eye = np.eye(q.shape[-1])
    np.testing.assert_array_equal(q[0], np.broadcast_to(eye, q[0].shape))  # task 0: never used
    assert np.abs(q[1, 0] - eye).max() > 1e-3  # task 1's Q trained
  with pytest.raises(ValueError, match="trgp: the stream has 2 tasks; --hp max_tasks=1"):
    continual.run_method("trgp", make, cfg._replace(hp={**hp, "max_tasks": 1}), [0])
