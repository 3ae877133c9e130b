"""The A-GEM code's own "EWC" and "MAS" (facebookresearch/agem, model/model.py and
fc_permute_mnist.py), which the A-GEM paper's EWC and MAS numbers come from.

Both keep ONE anchor (the params at the end of the last task, ``star_vars``) and the
importance of the LAST task only, and add lambda * sum(Omega (theta - theta*)^2) (no 1/2)
to the mean cross-entropy: the gradient of ``cl_optax.online_ewc(2 lambda, decay=0)``.

* EWC (``create_fisher_ops``): a running Fisher of squared MINIBATCH gradients of the
  cross-entropy. Every step adds the squared gradient to ``tmp``; every
  ``FISHER_UPDATE_AFTER = 10`` steps (before that step's update)
  ``F <- (1 - 0.9) F + 0.9 / 10 * tmp`` and ``tmp <- 0``. ``F`` is never reset between
  tasks; at a task's end it is min-max normalised to [0, 1] over the whole network
  (``normalize_fisher_at_minima``) and becomes the penalty's importance.
* MAS (``create_hebbian_ops``, ``task_updates``): after a task, Omega = (1/N) sum over the
  task's batches of 10 of |d sum_batch ||logits||^2 / d theta| (the absolute value of the
  batch's summed gradient, not of per-example gradients), reset at every task's end.
"""

import functools

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _fisher_init(a: AuxInit):
  z = jax.tree.map(jnp.zeros_like, a.params)
  return {"tmp": z, "running": z, "step": jnp.zeros((), jnp.int32)}


def _fisher_step(s: Step):
  """The A-GEM code's running Fisher, updated at every training step (before the update)."""
  g = jax.grad(s.loss_fn)(s.params, s.x, s.y, jnp.full(s.y.shape, s.task))
  every, decay = int(s.hp["fisher_every"]), s.hp["fisher_decay"]
  step = s.aux["step"]  # the step within the task (the code's `iters`)
  flush = (step + 1) % every == 0
  running = jax.tree.map(
    lambda r, t: jnp.where(flush, (1.0 - decay) * r + decay / every * t, r),
    s.aux["running"], s.aux["tmp"],
  )  # fmt: skip
  tmp = jax.tree.map(lambda t, gi: jnp.where(flush, 0.0, t) + gi * gi, s.aux["tmp"], g)
  return {}, {"tmp": tmp, "running": running, "step": step + 1}


def minmax_normalise(tree):
  """``(F - min F) / (max F - min F + 1e-32)``, min and max over every leaf together."""
  leaves = jax.tree.leaves(tree)
  lo = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  hi = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
  return jax.tree.map(lambda x: (x - lo) / (hi - lo + 1e-32), tree)


def _consolidate_ewc(e: TaskEnd):
  imp = minmax_normalise(e.aux["running"])
  aux = {
    "tmp": jax.tree.map(jnp.zeros_like, e.aux["tmp"]),  # reset_tmp_fisher
    "running": e.aux["running"],
    "step": jnp.zeros((), jnp.int32),
  }
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), aux


@functools.partial(jax.jit, static_argnums=0)
def _mas_sum(fn, params, xs):
  def body(acc, x):
    active = fn(params, x) > -1e8  # inactive head columns (-1e9) do not count

    def sq(p):
      return jnp.sum(jnp.square(jnp.where(active, fn(p, x), 0.0)))

    return jax.tree.map(lambda a, b: a + jnp.abs(b), acc, jax.grad(sq)(params)), None

  acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
  return acc


def mas_importance(fn, params, xs):
  """The A-GEM code's MAS Omega. ``xs`` is ``[n_batches, B, ...]``: the mean over the
  ``n_batches * B`` examples of |gradient of each batch's summed squared logits|."""
  n = xs.shape[0] * xs.shape[1]
  return jax.tree.map(lambda a: a / n, _mas_sum(fn, params, xs))


def _consolidate_mas(e: TaskEnd):
  imp = mas_importance(e.heads.task[e.task], e.params, e.batches[0])
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), e.aux


register(
  Method(
    "ewc_agem_code",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], decay=0.0), h.base()),
    "the A-GEM code's EWC: one anchor, last task's running minibatch Fisher, min-max normalised",
    end_task=_consolidate_ewc,
    init_aux=_fisher_init,
    step=_fisher_step,
    defaults={"strength": 2 * 10.0, "fisher_every": 10, "fisher_decay": 0.9},
  )
)
register(
  Method(
    "mas_agem_code",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], decay=0.0), h.base()),
    "the A-GEM code's MAS: one anchor, Omega of the last task from minibatch output-norm gradients",
    end_task=_consolidate_mas,
    defaults={"strength": 2 * 0.1},
  )
)
