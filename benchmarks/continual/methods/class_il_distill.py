"""Class-incremental distillation with a herding memory: iCaRL and WA (class-IL streams).

Both keep a `replay.ClassBalanced` memory rebuilt after every task
(`finish_task`, before the evaluation): each class is shrunk to
``K // n_seen`` items (`replay.shrink`, herding order kept) and each new class
filled with its `replay.herding_select` order on the head's input features
(L2-normalised, iCaRL), and the previous model (the teacher) is kept.

* iCaRL (Rebuffi et al. 2017): `losses.icarl_bce` on the current batch and a
  memory batch, targets from the teacher's sigmoids on the old classes
  (`own_loss`); evaluated with the nearest mean of exemplars
  (`replay.class_means` / `replay.nme_predict` over the stored classes:
  ``eval_apply``).
* WA (Zhao et al. 2020): ``(1 - λ) CE + λ KD`` with ``λ = known / total``
  (`losses.masked_cross_entropy` over the seen classes, `losses.lwf_distillation`
  at T 2 over the old ones, as PyCIL), on the current batch and a memory batch;
  after each task from the second on, `cl_optax.weight_align` scales the new
  classes' head columns, applied as a boundary write (`consolidate` +
  `apply_pending_writes` of the `boundary_writes` last in the chain); ``align=0``
  skips it (CE + KD alone, the ablation of `REPRODUCTION.md`); ``kd=2`` weighs the
  loss as the PyCIL ``models/wa.py`` read at ``716625e`` (``CE + 2 KD``; the
  ``λ = known/total`` form is an earlier PyCIL's, as the research notes cite it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.methods.class_il import _gdumb_init
from benchmarks.continual.model import mlp_tapped
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _features(params, x):
  return mlp_tapped(params, x)[1]["head"]


def _init(a: AuxInit):
  return {"memory": _gdumb_init(a), "teacher": jax.tree.map(jnp.copy, a.params),
          "old": jnp.zeros((a.n_outputs,), jnp.bool_)}  # fmt: skip


def _batch_and_memory(s: Step):
  """The current batch with a memory batch (its rows weighted by ``valid``)."""
  (mx, my), ok = cl_optax.replay.sample(s.aux["memory"], s.key, s.hp["memory_batch"])
  x = jnp.concatenate([s.x, mx])
  y = jnp.concatenate([s.y.astype(jnp.int32), my])
  w = jnp.concatenate([jnp.ones(s.y.shape, jnp.float32), ok.astype(jnp.float32)])
  return x, y, w


def _icarl_loss(s: Step, params):
  x, y, w = _batch_and_memory(s)
  teacher = jax.lax.stop_gradient(s.apply(s.aux["teacher"], x))
  return cl_optax.losses.icarl_bce(s.apply(params, x), y, teacher_logits=teacher,
                                   old_mask=s.aux["old"], weights=w)  # fmt: skip


def _wa_loss(s: Step, params):
  x, y, w = _batch_and_memory(s)
  z = s.apply(params, x)
  seen = s.aux["old"] | cl_optax.losses.seen_classes_mask(s.y, s.aux["old"].shape[0])
  ce = cl_optax.losses.masked_cross_entropy(z, y, seen, weights=w)
  kd = cl_optax.losses.lwf_distillation(z, s.apply(s.aux["teacher"], x), temperature=2.0,
                                        where=s.aux["old"], weights=w)  # fmt: skip
  if s.hp["kd"] != "lambda":  # PyCIL's wa.py at 716625e: CE + kd x KD
    return ce + s.hp["kd"] * kd
  lam = jnp.sum(s.aux["old"]) / jnp.maximum(jnp.sum(seen), 1)
  return (1.0 - lam) * ce + lam * kd


_herd = jax.jit(cl_optax.replay.herding_select, static_argnames=("num",))


def _rebuild(memory, params, x, y, new):
  """Shrink to K // n_seen per class, then fill each new class in herding order (eager)."""
  seen = np.asarray((memory.class_count > 0) | new)
  per = memory.slot_class.shape[0] // max(int(seen.sum()), 1)
  memory = cl_optax.replay.shrink(memory, per)
  feats = _features(params, x)
  y_np = np.asarray(y)
  for c in np.flatnonzero(np.asarray(new)):
    rows = np.flatnonzero(y_np == c)
    idx, _ = _herd(feats[rows], num=min(per, len(rows)))
    pick = rows[np.asarray(idx)]
    memory = cl_optax.replay.fill(memory, (x[pick], y[pick]), y[pick])
  return memory


def _finish(e: TaskEnd, align: bool):
  x, y = e.batches[0][0], e.batches[1][0].astype(jnp.int32)
  n_out = e.aux["old"].shape[0]
  new = cl_optax.losses.seen_classes_mask(y, n_out)
  params, opt_state = e.params, e.opt_state
  if align and e.hp["align"] and bool(jnp.any(e.aux["old"])):
    w, m, _ = cl_optax.weight_align(params, "head/kernel", old_classes=e.aux["old"],
                                    new_classes=new & ~e.aux["old"])  # fmt: skip
    opt_state = cl_optax.consolidate(opt_state, params, writes=w, write_mask=m)
    params, opt_state = cl_optax.apply_pending_writes(params, opt_state)
  memory = _rebuild(e.aux["memory"], params, x, y, new)
  aux = {"memory": memory, "teacher": jax.tree.map(jnp.copy, params), "old": e.aux["old"] | new}
  return params, opt_state, aux


def nme_apply(model, params_aux, x):
  """iCaRL's classifier as logits: minus the distance to each stored class's mean."""
  params, aux = params_aux
  memory = aux["memory"]
  mx, my = memory.items
  means, present = cl_optax.replay.class_means(
    _features(params, mx), my, memory.class_count.shape[0], where=cl_optax.replay.filled(memory)
  )
  phi = _features(params, x)
  phi = phi / jnp.maximum(jnp.linalg.norm(phi, axis=-1, keepdims=True), 1e-12)
  dist = jnp.sum(jnp.square(phi[:, None, :] - means[None]), -1)
  return jnp.where(present[None], -dist, -1e9)


_HP = {"buffer": 500, "memory_batch": 10}
register(
  Method(
    "icarl",
    lambda h: optax.chain(optax.add_decayed_weights(h.hp["wd"]), h.base()),
    "iCaRL (Rebuffi et al. 2017): herding memory, losses.icarl_bce, nearest-mean-of-exemplars",
    init_aux=_init,
    loss=_icarl_loss,
    own_loss=True,
    finish_task=lambda e: _finish(e, align=False),
    eval_apply=nme_apply,
    defaults={**_HP, "wd": 0.0},
  )
)
register(
  Method(
    "wa",
    lambda h: optax.chain(h.base(), cl_optax.boundary_writes()),
    "WA (Zhao et al. 2020): CE + KD on a herding memory, cl_optax.weight_align as a boundary write",
    init_aux=_init,
    loss=_wa_loss,
    own_loss=True,
    finish_task=lambda e: _finish(e, align=True),
    defaults={**_HP, "align": 1, "kd": "lambda"},
  )
)
