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
  crops with 4-pixel padding. By default the network is the runner's MLP (biases,
  no BatchNorm); ``bn=1`` trains the official ``FCBlock`` net (Linear without
  bias + BatchNorm1d, ReLU but after the last) and folds its eval-mode BatchNorm
  into the runner's MLP for evaluation; ``half=1`` stores the weights and the
  momentum in float16 (the official ``model.half()``, no float32 master copy).
  The reported number is the final pass's accuracy (the official code keeps the
  best test accuracy over the passes).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.methods.rehearsal import _sample, _write, reservoir_init
from benchmarks.continual.model import mlp_layer_names
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


class _PlainNet(NamedTuple):
  """The runner's MLP as it is (``init`` -> trainable, state; ``loss``; ``fold`` -> params)."""

  apply: Any

  def init(self, params):
    return params, {}

  def loss(self, p, state, x, y, w, seen):
    return cl_optax.losses.masked_cross_entropy(self.apply(p, x), y, seen, weights=w), state

  def fold(self, p, state):
    return p


class _BatchNormNet(NamedTuple):
  """GDumb's MLP (``src/models/layers.py`` ``FCBlock``): each layer Linear without bias, then
  BatchNorm1d (affine, eps 1e-6, momentum 0.1), then ReLU (none after the last). Batch
  statistics over the batch's valid rows; ``fold`` writes the eval-mode network into the
  runner's MLP (kernel ``W s``, bias ``beta - mean s``, ``s = gamma / sqrt(var + eps)``)."""

  eps: float = 1e-6
  momentum: float = 0.1

  def init(self, params):
    width = {n: layer["kernel"].shape[-1] for n, layer in params.items()}
    bn = {n: {"scale": jnp.ones(k), "offset": jnp.zeros(k)} for n, k in width.items()}
    kernels = {n: {"kernel": layer["kernel"]} for n, layer in params.items()}
    stats = {n: {"mean": jnp.zeros_like(b["scale"]), "var": jnp.ones_like(b["scale"])}
             for n, b in bn.items()}  # fmt: skip
    return (kernels, bn), stats

  def loss(self, trainable, stats, x, y, w, seen):
    kernels, bn = trainable
    names = mlp_layer_names(len(kernels))
    m = jnp.sum(w)
    wn = w / jnp.maximum(m, 1.0)
    h, new = x.reshape(x.shape[0], -1), {}
    for i, n in enumerate(names):
      z = h @ kernels[n]["kernel"]
      mu = wn @ z
      var = wn @ jnp.square(z - mu)
      unbiased = var * m / jnp.maximum(m - 1.0, 1.0)
      seen_now = {"mean": mu, "var": unbiased}
      new[n] = {k: (1 - self.momentum) * stats[n][k] + self.momentum * jax.lax.stop_gradient(v)
                for k, v in seen_now.items()}  # fmt: skip
      h = (z - mu) * jax.lax.rsqrt(var + self.eps) * bn[n]["scale"] + bn[n]["offset"]
      h = jax.nn.relu(h) if i < len(names) - 1 else h
    return cl_optax.losses.masked_cross_entropy(h, y, seen, weights=w), new

  def fold(self, trainable, stats):
    kernels, bn = trainable
    out = {}
    for n in kernels:
      s = bn[n]["scale"] * jax.lax.rsqrt(stats[n]["var"] + self.eps)
      out[n] = {"kernel": kernels[n]["kernel"] * s, "bias": bn[n]["offset"] - stats[n]["mean"] * s}
    return out


def _fit(params, memory, key, hp, net):
  """Trains ``params`` on the memory alone: ``passes`` epochs of batch 16, GDumb's schedule."""
  cap, batch = memory.slot_class.shape[0], int(hp["fit_batch"])
  steps = -(-cap // batch)
  full = cl_optax.replay.filled(memory)
  n = jnp.sum(full)
  seen = memory.class_count > 0
  # torch's SGD(momentum 0.9, weight_decay 1e-6) after clip_grad_norm(10); lr applied per pass
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.add_decayed_weights(1e-6),
                   optax.trace(decay=0.9))  # fmt: skip
  trainable, stats = net.init(params)
  # half=1: weights and momentum stored in float16, as the official `model.half()` with torch's SGD
  trainable = jax.tree.map(lambda v: v.astype(jnp.float16 if hp["half"] else v.dtype), trainable)

  def epoch(carry, e):
    p, st, stats, k = carry
    k, k_perm, k_crop = jax.random.split(k, 3)
    order = jnp.argsort(jnp.where(full, jax.random.uniform(k_perm, (cap,)), 2.0))
    order = jnp.pad(order, (0, steps * batch - cap)).reshape(steps, batch)
    lr = sgdr_epoch_lr(e, hp["maxlr"], hp["minlr"])

    def step(c, inp):
      i, idx = inp
      w = ((i * batch + jnp.arange(batch)) < n).astype(jnp.float32)
      x, y = cl_optax.replay.take(memory, idx)
      x = _crop(jax.random.fold_in(k_crop, i), x, int(hp["crop"])) if hp["crop"] else x

      def do(c):
        g, stats = jax.grad(net.loss, has_aux=True)(c[0], c[2], x, y, w, seen)
        u, s2 = tx.update(g, c[1], c[0])
        return optax.apply_updates(c[0], jax.tree.map(lambda v: -lr * v, u)), s2, stats

      return jax.lax.cond(jnp.any(w > 0), do, lambda c: c, c), None

    (p, st, stats), _ = jax.lax.scan(step, (p, st, stats), (jnp.arange(steps), order))
    return (p, st, stats, k), None

  init = (trainable, tx.init(trainable), stats, key)
  (trainable, _, stats, _), _ = jax.lax.scan(epoch, init, jnp.arange(int(hp["passes"])))
  return net.fold(jax.tree.map(lambda v: v.astype(jnp.float32), trainable), stats)


_FITS: dict = {}


def _gdumb_finish(e: TaskEnd):
  """A fresh network trained on the memory (every task, so the accuracy matrix fills)."""
  n_out = e.params["head"]["kernel"].shape[-1]
  k_init, k_fit = jax.random.split(e.key)
  fresh = e.model.init(k_init, e.batches[0].shape[2:], n_out)
  if e.hp["bn"] and "bias" not in fresh["head"]:
    raise ValueError("gdumb: bn=1 folds BatchNorm into the layers' biases: the model needs biases.")
  net = _BatchNormNet() if e.hp["bn"] else _PlainNet(e.model.apply)
  sig = (e.model, n_out, tuple(sorted(e.hp.items())))
  if sig not in _FITS:  # one compilation per run's settings
    _FITS[sig] = jax.jit(lambda p, m, k: _fit(p, m, k, e.hp, net))
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
      "bn": 0,
      "half": 0,
    },  # fmt: skip
  )
)
