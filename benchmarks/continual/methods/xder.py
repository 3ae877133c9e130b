"""X-DER (Boschini et al., TPAMI 2022), class-IL: mammoth's ``xder`` with its SupCon term.

The heads are the tasks' class blocks (`s.valid`: the classes active at each task),
so a class's task is the first task whose active set holds it. Read in
aimagelab/mammoth ``models/xder.py`` and ``utils/simclrloss.py`` (``0d727a7``).

* Loss (`own_loss`): CE of the current batch over the current task's classes only;
  ``alpha`` times `losses.der_logit_mse` on a memory batch (all heads); ``beta``
  times the CE of a second memory batch over the past tasks' classes; ``eta`` times
  `losses.xder_future_constraint` on the current and first memory batch (own head:
  the current task's for stream rows, the label's task's for memory rows);
  ``past_eta`` times `losses.xder_past_constraint` on the current batch (on at
  ``0d727a7`` with the same ``eta`` and margin; ``past_eta=0`` drops it); while a
  future head exists, ``lambd`` times `losses.xder_consistency` (SupCon, temperature
  ``simclr_temp``) on ``num_aug`` augmented views of the current batch and a third
  memory batch of ``simclr_batch`` items, set ``lambd=0`` for mammoth's ``xder_ce``.
* Step: the two memory batches' rows are de-duplicated and the past-task items'
  stored logits rewritten on the current and future heads with probability ``1/u``
  (`losses.xder_rewrite_select`, the per-slot counters ``u`` reset at each task's end;
  `losses.xder_logit_update`, ``gamma`` 0.85; `replay.write`).
* Memory (`finish_task`, not written during training): shrink to ``K // n_seen``
  per class, fill each new class with its first items (arrival order) and the
  network's logits, past heads passed through the update (``U(out, out, y, 0, t)``),
  then the stored old items' logits updated on the current and future heads.

Defaults: ``alpha`` 0.1, ``beta`` 0.5 (mammoth's ``xder_ce`` config; ``xder.yaml`` has
only a CIFAR-100 row, 0.3 / 0.8), ``gamma`` 0.85, ``margin`` 0.3, ``eta`` = ``past_eta``
0.1, ``lambd`` 0.1, ``simclr_temp`` 5, ``simclr_batch`` 64, ``num_aug`` 2 (the parser's
defaults of ``models/xder.py`` at ``0d727a7``). ``--hp lambd=0 --hp past_eta=0 --hp
eta=5e-3 --hp margin=0.1`` is ``xder_ce`` as its config runs it.

Departures: mammoth's views come from ``strong_aug`` (random resized crops, colour
jitter, grey-scale, flips: CIFAR's); here random 28 x 28 crops of the 4-pixel padded
digit (``crop``), no flips. ``align_bn`` (no BatchNorm here) is left out.
"""

import jax
import jax.numpy as jnp
import numpy as np

import cl_optax
from benchmarks.continual.methods.class_il import _crop
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _init(a: AuxInit):
  example = {"x": jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
             "y": jax.ShapeDtypeStruct((), jnp.int32),
             "logits": jax.ShapeDtypeStruct((a.n_outputs,), jnp.float32)}  # fmt: skip
  memory = cl_optax.replay.init_balanced(example, a.hp["buffer"], a.n_outputs)
  return {"memory": memory, "u": jnp.zeros((a.hp["buffer"],), jnp.float32)}


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
  mem = s.aux["memory"]
  past, cur, fut, _ = _blocks(s.columns, s.valid, s.task, mem.items["logits"].shape[-1])
  pairs = [cl_optax.replay.sample_indices(mem, jax.random.fold_in(s.key, d), s.hp["memory_batch"])
           for d in (1, 2)]  # the loss's two memory batches  # fmt: skip
  idx = jnp.concatenate([p[0] for p in pairs])
  m = cl_optax.replay.take(mem, idx)
  new = jax.lax.stop_gradient(s.apply(s.params, m["x"]))
  eligible = jnp.concatenate([p[1] for p in pairs]) & past[m["y"]]
  rewrite, u = cl_optax.losses.xder_rewrite_select(idx, eligible, s.aux["u"],
                                                   jax.random.fold_in(s.key, 3))  # fmt: skip
  logits = cl_optax.losses.xder_logit_update(m["logits"], new, m["y"], cur | fut,
                                             gamma=s.hp["gamma"], where=rewrite)  # fmt: skip
  mem = cl_optax.replay.write(mem, idx, {**m, "logits": logits}, where=rewrite)
  return {}, {"memory": mem, "u": u}


def _consistency(s: Step, params, fut, task_of):
  """``lambd`` x SupCon on the future heads of augmented views (heads put in task order)."""
  (mx, ok), n = cl_optax.replay.sample(s.aux["memory"], jax.random.fold_in(s.key, 4),
                                       s.hp["simclr_batch"]), s.hp["simclr_batch"]  # fmt: skip
  x = jnp.concatenate([mx["x"], s.x[:n]])
  y = jnp.concatenate([mx["y"], s.y[:n].astype(jnp.int32)])
  ok = jnp.concatenate([ok, jnp.ones(y.shape[0] - ok.shape[0], bool)])
  k = jax.random.fold_in(s.key, 5)
  views = [_crop(jax.random.fold_in(k, v), x, int(s.hp["crop"])) for v in range(s.hp["num_aug"])]
  z = jnp.stack([s.apply(params, xv) for xv in views], axis=1)  # [N, V, C]
  order = jnp.argsort(task_of, stable=True)  # heads as consecutive blocks
  head = z.shape[-1] // s.n_tasks
  cons = cl_optax.losses.xder_consistency(z[..., order], y, fut[order], head_size=head,
                                          temperature=s.hp["simclr_temp"], where=ok)  # fmt: skip
  return s.hp["lambd"] * cons


def _loss(s: Step, params):
  mem = s.aux["memory"]
  past, cur, fut, task_of = _blocks(s.columns, s.valid, s.task, mem.items["logits"].shape[-1])
  y = s.y.astype(jnp.int32)
  z = s.apply(params, s.x)
  loss = cl_optax.losses.masked_cross_entropy(z, y, cur)
  (m1, ok1), (m2, ok2) = (
    cl_optax.replay.sample(mem, jax.random.fold_in(s.key, d), s.hp["memory_batch"]) for d in (1, 2)
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
  loss += s.hp["eta"] * jnp.where(jnp.any(fut), fc, 0.0)
  loss += s.hp["past_eta"] * cl_optax.losses.xder_past_constraint(z, past, cur,
                                                                 margin=s.hp["margin"])  # fmt: skip
  if s.hp["lambd"]:
    loss += _consistency(s, params, fut, task_of)
  return loss


def _finish(e: TaskEnd):
  """The class-balanced rebuild with the updated logits (eager)."""
  x, y = e.batches[0][0], e.batches[1][0].astype(jnp.int32)
  mem = e.aux["memory"]
  n_out = mem.items["logits"].shape[-1]
  past, cur, fut, _ = _blocks(e.heads.columns, e.heads.valid, e.task, n_out)
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
  return e.params, e.opt_state, {"memory": mem, "u": jnp.zeros_like(e.aux["u"])}


register(
  Method(
    "xder",
    lambda h: h.base(),
    "X-DER (Boschini et al. 2022): class-balanced memory with 1/u logit rewrites, "
    "DER + past-head CE + future constraint + SupCon consistency on future heads",
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
      "margin": 0.3,
      "eta": 0.1,
      "past_eta": 0.1,
      "lambd": 0.1,
      "simclr_temp": 5.0,
      "simclr_batch": 64,
      "num_aug": 2,
      "crop": 4,
    },  # fmt: skip
  )
)
