"""GEM vs A-GEM vs plain SGD on permuted MNIST (or digits) with a Flax NNX MLP.

The stream, model and protocol are those of ``examples/flax_agem.py``. GEM's
memory keeps the last 256 examples of every task (``n_memories``, a per-task
ring in ``cl_optax.replay``). At each step the gradients of all past tasks'
memory losses come from ONE ``vmap`` ped backward over the ``[max_tasks, 256]``
memory (no Python loop over tasks), and ``cl_optax.gem`` solves its dual QP
inside the same jitted step; slots of tasks not seen yet are masked out by
``task_mask``, so shapes never change and nothing retraces.

  python examples/flax_gem.py --seeds 3
  python examples/flax_gem.py --methods gem --data digits
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax_agem import cross_entropy, make_agem_step, parse_args, run_all

from cl_optax import replay


def make_gem_step(graphdef, tx):
  """GEM step: per-task memory gradients (one vmapped backward) + QP update + write."""

  def loss(params, x, y, w=None):
    return cross_entropy(nnx.merge(graphdef, params)(x), y, w)

  @jax.jit
  def step(params, opt_state, memory, x, y, task, key):
    del key
    grads = jax.grad(loss)(params, x, y)
    xm, ym = memory.items  # [max_tasks, n_memories, ...]
    valid = replay.filled(memory)  # [max_tasks, n_memories]
    task_grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(params, xm, ym, valid)
    task_mask = (jnp.arange(valid.shape[0]) < task) & valid.any(1)  # past tasks only
    updates, opt_state = tx.update(
      grads, opt_state, params, task_grads=task_grads, task_mask=task_mask
    )
    params = optax.apply_updates(params, updates)
    return params, opt_state, replay.add(memory, (x, y), task=task)

  return step


def main():
  args = parse_args(__doc__, "sgd,agem,gem", 256)

  def make_step(method, graphdef, tx):
    if method == "gem":
      return make_gem_step(graphdef, tx)
    return make_agem_step(graphdef, tx, ref_batch=256)  # sgd ignores the ref_grads

  run_all(args, make_step)


if __name__ == "__main__":
  main()
