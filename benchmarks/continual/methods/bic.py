"""BiC (Wu et al., CVPR 2019), class-IL: herding memory, t/(t+1) distillation, bias layer.

* Stage 1 (`own_loss`): `losses.bic_loss` on the current batch and a memory batch,
  ``λ = t/(t+1)`` on the distillation (T 2, no T²) to the teacher, whose newest
  group is corrected with the previous ``(β, γ)`` (`losses.bias_correct`).
* Held-out split: a ``val_frac`` share of the stream (0.1, as mammoth's
  ``valset_split`` and the official 10 % of the exemplars) is never trained on: an
  example is held out when a fixed hash of its pixels (`held_out`) falls below
  ``val_frac``, so the same example is held out in the step and at the boundary, in
  any order and epoch. Those rows weigh 0 in stage 1; they feed only a validation
  memory of ``round(val_frac * buffer)`` slots (class-balanced, ``K_val // n_seen``
  per class, the first held-out items of each new class), and the training memory
  (the other ``buffer - K_val`` slots) is rebuilt by herding from the rest, so the two
  memories never share an item (as the official split: new classes' validation data
  held out of their training data, old classes' from exemplars kept out of training).
* After each task (`finish_task`): the herding rebuild of iCaRL/WA, then ``(β, γ)``
  fitted on the validation memory with `losses.bic_bias_loss` (SGD momentum 0.9,
  ``bias_steps`` full-batch steps, lr ``bias_lr``), evaluated through
  `losses.bias_correct` on the newest task's classes (``eval_apply``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.methods.class_il_distill import _batch_and_memory, _init, _rebuild
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def held_out(x, frac):
  """bool ``[n]``: the examples kept out of training, a fixed hash of each one's pixels."""
  flat = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  proj = jax.random.normal(jax.random.key(20190616), (flat.shape[1],), jnp.float32)
  score = flat @ proj * 1000.0
  return (score - jnp.floor(score)) < frac


def _val_capacity(hp):
  return int(round(hp["val_frac"] * hp["buffer"]))


def _bic_init(a: AuxInit):
  k_val = _val_capacity(a.hp)
  train = _init(a._replace(hp={**a.hp, "buffer": a.hp["buffer"] - k_val}))
  val = _init(a._replace(hp={**a.hp, "buffer": max(k_val, 1)}))["memory"]
  return {**train, "val": val, "bias": jnp.array([1.0, 0.0], jnp.float32),
          "newest": jnp.zeros((a.n_outputs,), jnp.bool_)}  # fmt: skip


def _bic_loss(s: Step, params):
  x, y, w = _batch_and_memory(s)
  n = s.x.shape[0]  # the current batch's held-out rows weigh 0
  w = w.at[:n].multiply(1.0 - held_out(s.x, s.hp["val_frac"]).astype(w.dtype))
  old = s.aux["old"]
  seen = old | cl_optax.losses.seen_classes_mask(s.y, old.shape[0])
  teacher = cl_optax.losses.bias_correct(s.apply(s.aux["teacher"], x), s.aux["bias"][0],
                                         s.aux["bias"][1], s.aux["newest"])  # fmt: skip
  return cl_optax.losses.bic_loss(s.apply(params, x), y, jax.lax.stop_gradient(teacher),
                                  task=s.task, old_mask=old, seen_mask=seen, weights=w)  # fmt: skip


def _fit_bias(logits, y, new, seen, steps, lr):
  tx = optax.sgd(lr, momentum=0.9)
  grad = jax.grad(cl_optax.losses.bic_bias_loss)

  def step(c, _):
    bg, st = c
    u, st = tx.update(grad(bg, logits, y, new, seen), st, bg)
    return (optax.apply_updates(bg, u), st), None

  bg = jnp.array([1.0, 0.0], jnp.float32)
  return jax.lax.scan(step, (bg, tx.init(bg)), None, length=steps)[0][0]


_fit_bias_jit = jax.jit(_fit_bias, static_argnames=("steps",))


def _fill_val(val, x, y, new, seen):
  """The validation memory: shrink to ``K_val // n_seen`` per class, then the first
  held-out items of each new class (eager)."""
  per = val.slot_class.shape[0] // max(int(np.sum(seen)), 1)
  val = cl_optax.replay.shrink(val, per)
  y_np = np.asarray(y)
  for c in np.flatnonzero(np.asarray(new)):
    rows = np.flatnonzero(y_np == c)[:per]
    if len(rows):
      val = cl_optax.replay.fill(val, (x[rows], y[rows]), y[rows])
  return val


def _bic_finish(e: TaskEnd):
  x, y = e.batches[0][0], e.batches[1][0].astype(jnp.int32)
  old = e.aux["old"]
  new = cl_optax.losses.seen_classes_mask(y, old.shape[0]) & ~old
  held = np.asarray(held_out(x, e.hp["val_frac"]))
  keep = np.flatnonzero(~held)
  memory = _rebuild(e.aux["memory"], e.params, x[keep], y[keep], new)
  out = np.flatnonzero(held)
  val = _fill_val(e.aux["val"], x[out], y[out], new, np.asarray(old | new))
  bias = jnp.array([1.0, 0.0], jnp.float32)
  if bool(jnp.any(old)):  # from the second task on
    rows = np.flatnonzero(np.asarray(cl_optax.replay.filled(val)))  # the held-out items
    vx, vy = val.items
    logits = e.model.apply(e.params, vx[rows])
    bias = _fit_bias_jit(logits, vy[rows], new, old | new, steps=int(e.hp["bias_steps"]),
                         lr=e.hp["bias_lr"])  # fmt: skip
  aux = {"memory": memory, "val": val, "teacher": jax.tree.map(jnp.copy, e.params),
         "old": old | new, "bias": bias, "newest": new}  # fmt: skip
  return e.params, e.opt_state, aux


def bic_apply(model, params_aux, x):
  params, aux = params_aux
  return cl_optax.losses.bias_correct(model.apply(params, x), aux["bias"][0], aux["bias"][1],
                                      aux["newest"])  # fmt: skip


register(
  Method(
    "bic",
    lambda h: h.base(),
    "BiC (Wu et al. 2019): herding memory, losses.bic_loss (t/(t+1)), bias layer fitted per "
    "task on a held-out validation memory",
    init_aux=_bic_init,
    loss=_bic_loss,
    own_loss=True,
    finish_task=_bic_finish,
    eval_apply=bic_apply,
    defaults={
      "buffer": 500,
      "memory_batch": 10,
      "bias_steps": 200,
      "bias_lr": 0.01,
      "val_frac": 0.1,
    },  # fmt: skip
  )
)
