"""BiC (Wu et al., CVPR 2019), class-IL: herding memory, t/(t+1) distillation, bias layer.

* Stage 1 (`own_loss`): `losses.bic_loss` on the current batch and a memory batch,
  ``λ = t/(t+1)`` on the distillation (T 2, no T²) to the teacher, whose newest
  group is corrected with the previous ``(β, γ)`` (`losses.bias_correct`).
* After each task (`finish_task`): the herding rebuild of iCaRL/WA, then ``(β, γ)``
  fitted on the memory with `losses.bic_bias_loss` (SGD momentum 0.9, ``bias_steps``
  full-batch steps, lr ``bias_lr``), evaluated through `losses.bias_correct` on the
  newest task's classes (``eval_apply``). Departure: the official code fits on a
  class-balanced validation split held out of stage-1 training (new classes' held-out
  data, 10 % of the exemplars); in a one-epoch stream every new-class example has been
  trained on, so this fits on the memory itself (the new classes' exemplars too).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.methods.class_il_distill import _batch_and_memory, _init, _rebuild
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _bic_init(a: AuxInit):
  return {**_init(a), "bias": jnp.array([1.0, 0.0], jnp.float32),
          "newest": jnp.zeros((a.n_outputs,), jnp.bool_)}  # fmt: skip


def _bic_loss(s: Step, params):
  x, y, w = _batch_and_memory(s)
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


def _bic_finish(e: TaskEnd):
  x, y = e.batches[0][0], e.batches[1][0].astype(jnp.int32)
  old = e.aux["old"]
  new = cl_optax.losses.seen_classes_mask(y, old.shape[0]) & ~old
  memory = _rebuild(e.aux["memory"], e.params, x, y, new)
  bias = jnp.array([1.0, 0.0], jnp.float32)
  if bool(jnp.any(old)):  # from the second task on
    rows = np.flatnonzero(np.asarray(cl_optax.replay.filled(memory)))  # the stored items
    mx, my = memory.items
    logits = e.model.apply(e.params, mx[rows])
    bias = _fit_bias_jit(logits, my[rows], new, old | new, steps=int(e.hp["bias_steps"]),
                         lr=e.hp["bias_lr"])  # fmt: skip
  aux = {"memory": memory, "teacher": jax.tree.map(jnp.copy, e.params), "old": old | new,
         "bias": bias, "newest": new}  # fmt: skip
  return e.params, e.opt_state, aux


def bic_apply(model, params_aux, x):
  params, aux = params_aux
  return cl_optax.losses.bias_correct(model.apply(params, x), aux["bias"][0], aux["bias"][1],
                                      aux["newest"])  # fmt: skip


register(
  Method(
    "bic",
    lambda h: h.base(),
    "BiC (Wu et al. 2019): herding memory, losses.bic_loss (t/(t+1)), bias layer fitted per task",
    init_aux=_bic_init,
    loss=_bic_loss,
    own_loss=True,
    finish_task=_bic_finish,
    eval_apply=bic_apply,
    defaults={"buffer": 500, "memory_batch": 10, "bias_steps": 200, "bias_lr": 0.01},
  )
)
