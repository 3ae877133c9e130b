"""Class-incremental replay: ER-ACE and GDumb (class-IL streams: one shared head, y = class).

* ER-ACE (Caccia et al. 2022): `losses.ace_cross_entropy` on the incoming batch
  replaces the runner's CE (`own_loss`), the reservoir batch's CE goes to
  ``experience_replay(1.0)`` (the official ``inc_loss + re_loss``); the aux
  carries the reservoir and the seen-classes mask.
* GDumb (Prabhu et al. 2020): nothing is trained on the stream (the base
  optimiser is ``set_to_zero``); the stream fills a greedy class-balanced
  memory (`replay.add_balanced(rule="greedy")`), and after every task
  (`finish_task`) a fresh network is trained on the memory alone with the
  official schedule: SGD momentum 0.9, weight decay 1e-6, batch 16, gradient
  norm clipped at 10, one warm-up pass at ``0.1 * maxlr``, then SGDR (cosine
  restarts of 1, 2, 4, ... passes from ``maxlr`` 0.05 down to 5e-4), random
  crops with 4-pixel padding. The runner's MLP has biases and no BatchNorm
  (the official ``FCBlock`` is Linear without bias + BatchNorm1d + ReLU), and
  the reported number is the final pass's accuracy (the official code keeps
  the best test accuracy over the passes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.methods.rehearsal import _sample, _write, reservoir_init
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


# --------------------------------------------------------------------------- ER-ACE
def _ace_init(a: AuxInit):
  return {"memory": reservoir_init(a), "seen": jnp.zeros((a.n_outputs,), jnp.bool_)}


def _ace_step(s: Step):
  """The reservoir batch's CE gradient (0 while empty); the batch written; seen updated."""
  mem = s._replace(aux=s.aux["memory"])
  m, ok = _sample(mem, 1)
  grads = jax.grad(s.loss_fn)(s.params, m["x"], m["y"], m["task"], ok)
  seen = s.aux["seen"] | cl_optax.losses.seen_classes_mask(s.y, s.aux["seen"].shape[0])
  return {"replay_grads": grads}, {"memory": _write(mem), "seen": seen}


def _ace_loss(s: Step, params):
  loss, _ = cl_optax.losses.ace_cross_entropy(s.apply(params, s.x), s.y, s.aux["seen"])
  return loss


register(
  Method(
    "er_ace",
    lambda h: optax.chain(cl_optax.experience_replay(1.0), h.base()),
    "ER-ACE (Caccia et al. 2022): losses.ace_cross_entropy on the stream + experience_replay",
    init_aux=_ace_init,
    step=_ace_step,
    loss=_ace_loss,
    own_loss=True,
    defaults={"buffer": 500, "memory_batch": 10},
  )
)


# --------------------------------------------------------------------------- GDumb
def _gdumb_init(a: AuxInit):
  example = (jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
             jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
  return cl_optax.replay.init_balanced(example, a.hp["buffer"], a.n_outputs)


def _gdumb_step(s: Step):
  y = s.y.astype(jnp.int32)
  return {}, cl_optax.replay.add_balanced(s.aux, (s.x, y), y, key=s.key, rule="greedy")


def sgdr_epoch_lr(epoch, maxlr, minlr):
  """GDumb's per-pass lr: pass 0 at 0.1 maxlr, then cosine restarts of 1, 2, 4, ... passes."""
  k = jnp.maximum(epoch - 1, 0).astype(jnp.float32)
  cycle = jnp.floor(jnp.log2(k + 1.0))  # cycle c covers k in [2^c - 1, 2^(c+1) - 1)
  start, length = 2.0**cycle - 1.0, 2.0**cycle
  cos = minlr + (maxlr - minlr) * 0.5 * (1.0 + jnp.cos(jnp.pi * (k - start) / length))
  return jnp.where(epoch == 0, 0.1 * maxlr, cos)


def _crop(key, x, pad):
  """Random ``28 x 28`` crops of the zero-padded images (torchvision RandomCrop(28, pad))."""
  side = int(round(np.sqrt(x.shape[-1])))
  if side * side != x.shape[-1]:  # not a square image: no crop
    return x
  imgs = jnp.pad(x.reshape(-1, side, side), ((0, 0), (pad, pad), (pad, pad)))
  offs = jax.random.randint(key, (x.shape[0], 2), 0, 2 * pad + 1)
  cut = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), (side, side)))
  return cut(imgs, offs).reshape(x.shape)


def _fit(params, memory, key, hp, apply, n_out):  # noqa: ARG001
  """Trains ``params`` on the memory alone: ``passes`` epochs of batch 16, GDumb's schedule."""
  cap, batch = memory.slot_class.shape[0], int(hp["fit_batch"])
  steps = -(-cap // batch)
  full = cl_optax.replay.filled(memory)
  n = jnp.sum(full)
  seen = memory.class_count > 0
  # torch's SGD(momentum 0.9, weight_decay 1e-6) after clip_grad_norm(10); lr applied per pass
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.add_decayed_weights(1e-6),
                   optax.trace(decay=0.9))  # fmt: skip

  def loss(p, x, y, w):
    return cl_optax.losses.masked_cross_entropy(apply(p, x), y, seen, weights=w)

  def epoch(carry, e):
    p, st, k = carry
    k, k_perm, k_crop = jax.random.split(k, 3)
    order = jnp.argsort(jnp.where(full, jax.random.uniform(k_perm, (cap,)), 2.0))
    order = jnp.pad(order, (0, steps * batch - cap)).reshape(steps, batch)
    lr = sgdr_epoch_lr(e, hp["maxlr"], hp["minlr"])

    def step(c, inp):
      p, st = c
      i, idx = inp
      w = (i * batch + jnp.arange(batch)) < n
      x, y = cl_optax.replay.take(memory, idx)
      x = _crop(jax.random.fold_in(k_crop, i), x, int(hp["crop"])) if hp["crop"] else x

      def do(c):
        g = jax.grad(loss)(c[0], x, y, w)
        u, s2 = tx.update(g, c[1], c[0])
        return optax.apply_updates(c[0], jax.tree.map(lambda v: -lr * v, u)), s2

      return jax.lax.cond(jnp.any(w), do, lambda c: c, (p, st)), None

    (p, st), _ = jax.lax.scan(step, (p, st), (jnp.arange(steps), order))
    return (p, st, k), None

  (params, _, _), _ = jax.lax.scan(epoch, (params, tx.init(params), key),
                                   jnp.arange(int(hp["passes"])))  # fmt: skip
  return params


_FITS: dict = {}


def _gdumb_finish(e: TaskEnd):
  """A fresh network trained on the memory (every task, so the accuracy matrix fills)."""
  n_out = e.params["head"]["kernel"].shape[-1]
  k_init, k_fit = jax.random.split(e.key)
  fresh = e.model.init(k_init, e.batches[0].shape[2:], n_out)
  sig = (e.model, n_out, tuple(sorted(e.hp.items())))
  if sig not in _FITS:  # one compilation per run's settings
    _FITS[sig] = jax.jit(lambda p, m, k: _fit(p, m, k, e.hp, e.model.apply, n_out))
  return _FITS[sig](fresh, e.aux, k_fit), e.opt_state, e.aux


register(
  Method(
    "gdumb",
    lambda h: optax.set_to_zero(),
    "GDumb (Prabhu et al. 2020): greedy class-balanced memory, retrained from scratch at each end",
    init_aux=_gdumb_init,
    step=_gdumb_step,
    finish_task=_gdumb_finish,
    defaults={
      "buffer": 500,
      "passes": 128,
      "fit_batch": 16,
      "maxlr": 0.05,
      "minlr": 5e-4,
      "crop": 4,
    },  # fmt: skip
  )
)
