"""The runner's TRGP entry: the trust region chosen from the next task's first examples at a task's
end, each task's Q trained only during that task, old tasks evaluated through their own view
(eval_view)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_continual_runner import _tiny_preset

import cl_optax
from benchmarks import continual
from benchmarks.continual.methods import trust_region as tr

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


def test_low_rank_training_forward_equals_the_scaled_weights():
  """The training forward (h W + ((h M)(Q - I)) M^T W) is the evaluation's W_eff forward."""
  model = tr.TRGPMLP(continual.MLP((5,), False), {"max_tasks": 3, "top": 2, "width": 3})
  params = model.init(jax.random.key(0), (6,), 4)
  rng = np.random.default_rng(0)
  params[tr.Q] = jax.tree.map(lambda q: q + 0.3 * rng.normal(size=q.shape), params[tr.Q])
  bases = {k: np.zeros((3, d, d)) for k, d in (("layer0", 6), ("head", 5))}
  for k, b in bases.items():
    for t in range(3):
      b[t, :, :2] = np.linalg.qr(rng.normal(size=(b.shape[1], b.shape[1])))[0][:, :2]
  sel = jnp.array([[0, 0], [0, 1], [1, 0]], jnp.int32)
  act = jnp.array([[False, False], [True, False], [True, True]])
  aux = {"bases": {k: jnp.asarray(b, jnp.float32) for k, b in bases.items()},
         "selected": {k: sel for k in bases}, "active": {k: act for k in bases}}  # fmt: skip
  x = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
  task = 2
  low = {}
  for k in bases:
    q = params[tr.Q][k][task]
    m = jnp.where(act[task][:, None, None], aux["bases"][k][sel[task]][:, :, : q.shape[-1]], 0.0)
    low[k] = (m, q, jnp.einsum("sdk,do->sko", m, params[k]["kernel"]))
  full = model.apply(tr._effective(params, aux, task), x)
  np.testing.assert_allclose(model.apply({**params, tr.LOW: low}, x), full, atol=1e-5)


class _Task:
  def __init__(self, x, y):
    self.x, self.y = x, y

  def train(self):
    return self.x, self.y


def test_trust_region_is_chosen_from_the_next_tasks_first_examples():
  """``_select``: task 1's trust region from the gradient of its loss on its first ``samples``
  examples at the end-of-task-0 weights (a hand-written cross-entropy here), and M, M^T W."""
  hp = {"max_tasks": 2, "top": 1, "width": 3, "samples": 5, "eps": 0.2, "official": False,
        "project_head": True}  # fmt: skip
  model = tr.TRGPMLP(continual.MLP((4,), False), hp)
  params = model.init(jax.random.key(0), (6,), 3)
  rng = np.random.default_rng(1)
  aux = tr._init_aux(continual.registry.AuxInit(2, (6,), hp, 3, params))
  bases = {}
  for k, b in aux["bases"].items():
    q = np.linalg.qr(rng.normal(size=(b.shape[1], b.shape[1])))[0]
    bases[k] = jnp.asarray(np.stack([q, np.zeros_like(q)]), jnp.float32)
  aux = {**aux, "bases": bases}
  x = rng.normal(size=(9, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=9)
  columns, valid = np.array([[0, 1, 2], [0, 1, 2]]), np.ones((2, 3), bool)
  heads = continual.model.make_heads(columns, valid, model)
  e = continual.registry.TaskEnd(0, params, None, aux, None, heads, hp, jax.random.key(0), model,
                                 None, 2, _Task(x, y))  # fmt: skip
  got = tr._select(e, aux)

  def xent(p):
    logits = model.apply(p, jnp.asarray(x[:5]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y[:5])).mean()

  g = jax.grad(xent)(params)
  for k in bases:
    sel, act = cl_optax.trgp_trust_region(g[k]["kernel"], bases[k], 1, 0.2, top=1)
    np.testing.assert_array_equal(got["selected"][k][1], sel)
    np.testing.assert_array_equal(got["active"][k][1], act)
    m = np.where(np.asarray(act)[:, None, None], np.asarray(bases[k])[np.asarray(sel)][:, :, :3], 0)
    np.testing.assert_allclose(got["m"][k], m, atol=1e-6)
    np.testing.assert_allclose(got["c"][k], np.einsum("sdk,do->sko", m, params[k]["kernel"]),
                               atol=1e-5)  # fmt: skip
  last = e._replace(next_task=None)
  with pytest.raises(ValueError, match="task 0 is the stream's last"):
    last.upcoming(5)
