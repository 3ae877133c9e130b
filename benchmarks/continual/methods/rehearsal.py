"""Replay and distillation: ER, DER, DER++ over a `cl_optax.replay.Reservoir`, and LwF.

The algebra (see `cl_optax.experience_replay` and `cl_optax.losses`):

* ER: the memory batch's cross-entropy gradient is a second gradient, fed to
  ``chain(experience_replay(w), base)`` as ``replay_grads=`` (the `step` hook).
* DER: the logit-matching term reads the current parameters' outputs on memory
  inputs, so it is a loss term (`loss` hook: ``alpha * losses.der_logit_mse``).
* DER++ = DER's loss term + ER's transform with ``w = beta`` on a second sample.
* LwF: distillation of the current batch's outputs to the previous model's
  (`loss` hook: ``losses.lwf_distillation`` over the old heads); the aux is the
  previous model's parameters, set at each task's end.

The memory is one reservoir over the whole stream (the DER paper's buffer), its
items ``{"x", "y", "task", "logits"}``; it takes each batch after the step's
samples are drawn, with the logits the network gave it before the update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def reservoir_init(a: AuxInit):
  example = {
    "x": jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
    "y": jax.ShapeDtypeStruct((), jnp.int32),
    "task": jax.ShapeDtypeStruct((), jnp.int32),
    "logits": jax.ShapeDtypeStruct((a.n_outputs,), jnp.float32),
  }
  return cl_optax.replay.init(example, a.hp["buffer"])


def _write(s: Step):
  """The current batch into the reservoir, with its logits at the current parameters."""
  batch = {
    "x": s.x,
    "y": s.y.astype(jnp.int32),
    "task": jnp.full(s.y.shape, s.task, jnp.int32),
    "logits": jax.lax.stop_gradient(s.apply(s.params, s.x)).astype(jnp.float32),
  }
  return cl_optax.replay.add(s.aux, batch, key=jax.random.fold_in(s.key, 0))


def _sample(s: Step, draw: int):
  return cl_optax.replay.sample(s.aux, jax.random.fold_in(s.key, draw), s.hp["memory_batch"])


def replay_grads_step(s: Step):
  """ER's memory gradient: the mean cross-entropy of a memory batch, each example
  through its own task's columns active now (0 while the memory is empty)."""
  m, ok = _sample(s, 1)
  grads = jax.grad(s.loss_fn)(s.params, m["x"], m["y"], m["task"], ok)
  return {"replay_grads": grads}, _write(s)


def write_step(s: Step):
  return {}, _write(s)


def der_loss(s: Step, params):
  """``alpha`` times the logit MSE on a memory batch (Buzzega et al. 2020, Eq. 4)."""
  m, ok = _sample(s, 2)
  return s.hp["alpha"] * cl_optax.losses.der_logit_mse(s.apply(params, m["x"]), m["logits"],
                                                        weights=ok)  # fmt: skip


def lwf_loss(s: Step, params):
  """Distillation to the previous model on the current batch, one term per old head.

  Task-IL: the mean over the heads of the tasks before the current one; a shared
  head (class- / domain-IL): the units active at the previous task. Weight
  ``alpha`` (times the number of old tasks with ``scale_by_tasks``: van de Ven &
  Tolias weight the distillation by ``1 - 1/t`` and the new loss by ``1/t``).
  """
  if s.aux is None:  # the first task: no previous model
    return jnp.zeros((), jnp.float32)
  heads = jnp.arange(s.n_tasks)
  z, z_old = s.apply(params, s.x), s.apply(s.aux, s.x)

  def term(j):
    cols = s.columns[j]
    return cl_optax.losses.lwf_distillation(
      z[:, cols], z_old[:, cols], temperature=s.hp["temperature"], where=s.valid[j]
    )

  per_head = jax.vmap(term)(heads)
  shared = jnp.all(s.columns == s.columns[0])
  w = jnp.where(shared, heads == s.task - 1, heads < s.task).astype(per_head.dtype)
  kd = jnp.sum(w * per_head) / jnp.maximum(jnp.sum(w), 1.0)
  scale = s.hp["alpha"] * (s.task.astype(kd.dtype) if s.hp["scale_by_tasks"] else 1.0)
  return scale * kd


def _keep_model(e: TaskEnd):
  return e.opt_state, jax.tree.map(jnp.copy, e.params)


def _er_make(h):
  w = h.hp["strength"]
  parts = [cl_optax.experience_replay(w)]
  if h.hp["union_mean"]:  # one step on the union batch: the mean, not the sum, of the losses
    parts.append(optax.scale(1.0 / (1.0 + w)))
  return optax.chain(*parts, h.base())


_MEMORY = {"buffer": 500, "memory_batch": 10}
register(
  Method(
    "er",
    _er_make,
    "ER (Chaudhry et al. 2019): reservoir memory, chain(experience_replay, base)",
    init_aux=reservoir_init,
    step=replay_grads_step,
    defaults={**_MEMORY, "strength": 1.0, "union_mean": True},
  )
)
register(
  Method(
    "der",
    lambda h: h.base(),
    "DER (Buzzega et al. 2020): reservoir of logits, alpha * losses.der_logit_mse in the loss",
    init_aux=reservoir_init,
    step=write_step,
    loss=der_loss,
    defaults={**_MEMORY, "alpha": 0.5},
  )
)
register(
  Method(
    "derpp",
    lambda h: optax.chain(cl_optax.experience_replay(h.hp["beta"]), h.base()),
    "DER++: DER's loss term + experience_replay(beta) on a second memory batch",
    init_aux=reservoir_init,
    step=replay_grads_step,
    loss=der_loss,
    defaults={**_MEMORY, "alpha": 0.5, "beta": 0.5},
  )
)
register(
  Method(
    "lwf",
    lambda h: h.base(),
    "LwF (Li & Hoiem 2016): losses.lwf_distillation to the previous model on the current batch",
    end_task=_keep_model,
    loss=lwf_loss,
    defaults={"alpha": 1.0, "temperature": 2.0, "scale_by_tasks": False},
  )
)
