"""X-DER (Boschini et al., TPAMI 2022), the ``xder_ce`` variant (no SupCon), class-IL.

The heads are the tasks' class blocks (`s.valid`: the classes active at each task),
so a class's task is the first task whose active set holds it.

* Loss (`own_loss`): CE of the current batch over the current task's classes only;
  ``alpha`` times `losses.der_logit_mse` on a memory batch (all heads); ``beta``
  times the CE of a second memory batch over the past tasks' classes; ``eta`` times
  `losses.xder_future_constraint` on the current and first memory batch (own head:
  the current task's for stream rows, the label's task's for memory rows).
* Step: the first memory batch's stored logits of past-task items are rewritten
  on the current and future heads (`losses.xder_logit_update`, ``gamma`` 0.85) and
  written back (`replay.sample_indices` / `replay.write`); the official code
  rewrites with probability ``1/u`` per slot per task, this every time.
* Memory (`finish_task`, not written during training): shrink to ``K // n_seen``
  per class, fill each new class with its first items (arrival order) and the
  network's logits, past heads passed through the update (``U(out, out, y, 0, t)``),
  then the stored old items' logits updated on the current and future heads.
"""

import jax
import jax.numpy as jnp
import numpy as np

import cl_optax
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _init(a: AuxInit):
  example = {"x": jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
             "y": jax.ShapeDtypeStruct((), jnp.int32),
             "logits": jax.ShapeDtypeStruct((a.n_outputs,), jnp.float32)}  # fmt: skip
  return cl_optax.replay.init_balanced(example, a.hp["buffer"], a.n_outputs)


def _blocks(columns, valid, task, n_out):
  """past / current / future masks over the output units and each unit's task (first
  active); class-IL: ``columns[t]`` is every unit, so the masks are ``valid``'s rows."""
  put = lambda c, v: jnp.zeros((n_out,), bool).at[c].max(v)  # noqa: E731
  valid = jax.vmap(put)(jnp.asarray(columns), jnp.asarray(valid))
  now = valid[task]
  past = jnp.where(task > 0, valid[jnp.maximum(task - 1, 0)], jnp.zeros_like(now))
  task_of = jnp.argmax(valid, axis=0)
  return past, now & ~past, ~now, task_of


def _step(s: Step):
  past, cur, fut, task_of = _blocks(s.columns, s.valid, s.task, s.aux.items["logits"].shape[-1])
  idx, ok = cl_optax.replay.sample_indices(
    s.aux, jax.random.fold_in(s.key, 1), s.hp["memory_batch"]
  )
  m = cl_optax.replay.take(s.aux, idx)
  new = jax.lax.stop_gradient(s.apply(s.params, m["x"]))
  rewrite = ok & past[m["y"]]
  logits = cl_optax.losses.xder_logit_update(m["logits"], new, m["y"], cur | fut,
                                             gamma=s.hp["gamma"], where=rewrite)  # fmt: skip
  return {}, cl_optax.replay.write(s.aux, idx, {**m, "logits": logits}, where=rewrite)


def _loss(s: Step, params):
  past, cur, fut, task_of = _blocks(s.columns, s.valid, s.task, s.aux.items["logits"].shape[-1])
  y = s.y.astype(jnp.int32)
  z = s.apply(params, s.x)
  loss = cl_optax.losses.masked_cross_entropy(z, y, cur)
  (m1, ok1), (m2, ok2) = (
    cl_optax.replay.sample(s.aux, jax.random.fold_in(s.key, d), s.hp["memory_batch"])
    for d in (1, 2)
  )
  z1 = s.apply(params, m1["x"])
  loss += s.hp["alpha"] * cl_optax.losses.der_logit_mse(z1, m1["logits"], weights=ok1)
  w2 = ok2 & past[m2["y"]]
  loss += s.hp["beta"] * cl_optax.losses.masked_cross_entropy(
    s.apply(params, m2["x"]), m2["y"], past | ~jnp.any(past), weights=w2
  )
  own = jnp.concatenate([jnp.broadcast_to(cur, z.shape),
                         task_of[None, :] == task_of[m1["y"]][:, None]])  # fmt: skip
  rows = jnp.concatenate([jnp.ones(y.shape, bool), ok1])
  fc = cl_optax.losses.xder_future_constraint(jnp.concatenate([z, z1]), own, fut,
                                              margin=s.hp["margin"], weights=rows)  # fmt: skip
  return loss + s.hp["eta"] * jnp.where(jnp.any(fut), fc, 0.0)


def _finish(e: TaskEnd):
  """The class-balanced rebuild with the updated logits (eager)."""
  x, y = e.batches[0][0], e.batches[1][0].astype(jnp.int32)
  n_out = e.aux.items["logits"].shape[-1]
  past, cur, fut, _ = _blocks(e.heads.columns, e.heads.valid, e.task, n_out)
  mem = e.aux
  seen = np.asarray((mem.class_count > 0) | cur)
  per = mem.slot_class.shape[0] // max(int(seen.sum()), 1)
  mem = cl_optax.replay.shrink(mem, per)
  full = cl_optax.replay.filled(mem)  # old items: logits on the current and future heads
  old = mem.items
  new = e.model.apply(e.params, old["x"])
  upd = cl_optax.losses.xder_logit_update(old["logits"], new, old["y"], cur | fut, where=full)
  mem = mem._replace(items={**old, "logits": upd})
  y_np = np.asarray(y)
  for c in np.flatnonzero(np.asarray(cur)):
    rows = np.flatnonzero(y_np == c)[:per]
    if not len(rows):
      continue
    out = e.model.apply(e.params, x[rows])
    out = cl_optax.losses.xder_logit_update(out, out, y[rows], past)
    mem = cl_optax.replay.fill(mem, {"x": x[rows], "y": y[rows], "logits": out}, y[rows])
  return e.params, e.opt_state, mem


register(
  Method(
    "xder",
    lambda h: h.base(),
    "X-DER (Boschini et al. 2022, xder_ce): class-balanced memory with logit rewrites, "
    "DER + past-head CE + future constraint",
    init_aux=_init,
    step=_step,
    loss=_loss,
    own_loss=True,
    finish_task=_finish,
    defaults={
      "buffer": 500,
      "memory_batch": 10,
      "alpha": 0.1,
      "beta": 0.5,
      "gamma": 0.85,
      "margin": 0.1,
      "eta": 5e-3,
    },  # fmt: skip
  )
)
