"""A-GEM and GEM: gradient projection against an episodic memory, a `cl_optax.replay.TaskRing`.

The ring is the method's aux, carried through the scan. Each step writes its batch
into the current task's ring (the task's most recent examples, GEM's rule), then
computes the reference gradients from the past tasks' memories inside the same
jitted step. Writing first lets XLA update the carried ring in place (see
`cl_optax.replay.sample`: read before the write, the ring is copied twice per
step). The reads see only past tasks' rows (rows of the current task are masked
out, or weighted 0), so the order does not change them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual.registry import AuxInit, Method, Step, register


def ring_init(a: AuxInit):
  example = {
    "x": jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
    "y": jax.ShapeDtypeStruct((), jnp.int32),
    "task": jax.ShapeDtypeStruct((), jnp.int32),
  }
  return cl_optax.replay.init(example, a.hp["memory_per_task"], num_tasks=a.n_tasks)


def _ring_write(s: Step):
  batch = {"x": s.x, "y": s.y.astype(jnp.int32), "task": jnp.full(s.y.shape, s.task, jnp.int32)}
  return cl_optax.replay.add(s.aux, batch, task=s.task)


def agem_step(s: Step):
  """g_ref on `memory_batch` examples drawn from the union of the past tasks' memories."""

  ring = _ring_write(s)

  def reference(params):
    past = jnp.arange(s.n_tasks) < s.task
    m, ok = cl_optax.replay.sample(ring, s.key, s.hp["memory_batch"], tasks=past)
    return jax.grad(s.loss_fn)(params, m["x"], m["y"], m["task"], ok)

  # task 0 has no memory: g_ref = 0 (agem passes g through) without the backward pass
  # over memory_batch empty rows (1/17 of A-GEM's FLOPs on the 17-task protocol)
  ref = jax.lax.cond(s.task > 0, reference, optax.tree.zeros_like, s.params)
  return {"ref_grads": ref}, ring


def gem_step(s: Step):
  """One gradient per past task on its whole memory: one vmapped backward pass.

  Only the rings of past tasks are read: a ``lax.switch`` over a few static ring
  counts (at least ``s.task``), zero-padded to all ``T`` rows, so task ``t``
  pays for about ``t`` memories rather than ``T`` (1.9x less over 17 tasks).
  """
  ring = _ring_write(s)
  items, full = ring.items, cl_optax.replay.filled(ring)  # [T, cap, ...], [T, cap]
  n_tasks = s.n_tasks
  grad = jax.grad(s.loss_fn)

  def over_first(w):
    def grads(params, items, full):
      if w == 0:
        return jax.tree.map(lambda p: jnp.zeros((n_tasks, *p.shape), p.dtype), params)
      g = jax.vmap(lambda x, y, t, m: grad(params, x, y, t, m))(
        items["x"][:w], items["y"][:w], items["task"][:w], full[:w]
      )
      return jax.tree.map(lambda a: jnp.pad(a, [(0, n_tasks - w)] + [(0, 0)] * (a.ndim - 1)), g)

    return grads

  step = max(1, -(-n_tasks // 6))
  widths = sorted({0, n_tasks, *range(step, n_tasks, step)})
  index = jnp.searchsorted(jnp.asarray(widths), s.task)  # the first width >= past tasks
  task_grads = jax.lax.switch(index, [over_first(w) for w in widths], s.params, items, full)
  mask = jnp.arange(n_tasks) < s.task
  return {"task_grads": task_grads, "task_mask": mask}, ring


register(
  Method(
    "agem",
    lambda h: optax.chain(cl_optax.agem(), h.base()),
    "A-GEM (Chaudhry et al. 2019): ring memory per task, g_ref from 256 memory examples per step",
    init_aux=ring_init,
    step=agem_step,
    defaults={"memory_per_task": 250, "memory_batch": 256},
  )
)
register(
  Method(
    "gem",
    lambda h: optax.chain(cl_optax.gem(h.hp["strength"]), h.base()),
    "GEM (Lopez-Paz & Ranzato 2017): one memory gradient per past task, QP in jit",
    init_aux=ring_init,
    step=gem_step,
    defaults={"memory_per_task": 256, "strength": 0.5},
  )
)
