"""Whole jitted train steps (forward, backward, transform, apply): a case's step, and
the SGD step of A-GEM vs GEM with their memory gradients."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks import lm
from benchmarks.continual.model import mlp_apply
from benchmarks.overhead_cases import MODELS, mlp_params


def _ce(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def step_timer(tx, params, make_state, batch, calls, model="mlp"):
  """Times a whole train step (forward, backward, transform, apply); params and state donated.

  MLPs: ``batch`` examples of 784 inputs; the LMs: ``batch`` sequences of bytes.
  """
  if model.startswith("lm"):
    name = model.removesuffix("-bf16")
    loss, data = lm.lm_loss(name), (lm.lm_batch(batch, lm.lm_config(name)["length"]),)
  else:
    x = jax.random.normal(jax.random.key(3), (batch, params["layer0"]["kernel"].shape[0]))
    y = jax.random.randint(jax.random.key(4), (batch,), 0, 10)
    loss, data = _ce, (x, y)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p, *data), s, p)
    return optax.apply_updates(p, u), s

  def run():
    out = step(jax.tree.map(jnp.copy, params), make_state())
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
      out = step(*out)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls

  return run


def _step_data(sizes, n_tasks: int, mem_per_task: int, batch: int, ref_batch: int):
  """Uniform inputs and random labels: the batch, A-GEM's reference batch and GEM's
  per-task memories ``[n_tasks, mem_per_task, ...]``."""
  keys = jax.random.split(jax.random.key(5), 6)
  x = jax.random.uniform(keys[0], (batch, sizes[0]))
  y = jax.random.randint(keys[1], (batch,), 0, sizes[-1])
  xr = jax.random.uniform(keys[2], (ref_batch, sizes[0]))
  yr = jax.random.randint(keys[3], (ref_batch,), 0, sizes[-1])
  xm = jax.random.uniform(keys[4], (n_tasks, mem_per_task, sizes[0]))
  ym = jax.random.randint(keys[5], (n_tasks, mem_per_task), 0, sizes[-1])
  return (x, y), (xr, yr), (xm, ym)


def _projection_steps(n_tasks: int, batch, ref, memory):
  """The transforms and jitted SGD steps of plain SGD, A-GEM (+ the reference gradient)
  and GEM (+ the memories' gradients in one ``vmap`` ped backward)."""
  (x, y), (xr, yr), (xm, ym) = batch, ref, memory
  mask = jnp.ones((n_tasks,), bool)
  grad = jax.grad(_ce)
  txs = {
    "sgd": optax.sgd(0.1),
    "agem": optax.chain(cl_optax.agem(), optax.sgd(0.1)),
    "gem": optax.chain(cl_optax.gem(max_tasks=n_tasks), optax.sgd(0.1)),
  }

  @jax.jit
  def sgd_step(params, state):
    updates, state = txs["sgd"].update(grad(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def agem_step(params, state):
    ref = grad(params, xr, yr)
    updates, state = txs["agem"].update(grad(params, x, y), state, params, ref_grads=ref)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def gem_step(params, state):
    task_grads = jax.vmap(grad, in_axes=(None, 0, 0))(params, xm, ym)
    updates, state = txs["gem"].update(
      grad(params, x, y), state, params, task_grads=task_grads, task_mask=mask
    )
    return optax.apply_updates(params, updates), state

  return txs, {"sgd": sgd_step, "agem": agem_step, "gem": gem_step}


def _best_times(steps: dict, states: dict, params, repeats: int, calls: int):
  """Min over interleaved repeats of each step's time per call; each step's last state."""

  def time_one(name):
    out = steps[name](params, states[name])
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(calls):
      out = steps[name](params, states[name])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls, out[1]

  times = {k: [] for k in steps}
  last = {}
  for _ in range(repeats):
    for name in steps:
      t, last[name] = time_one(name)
      times[name].append(t)
  return {k: min(v) for k, v in times.items()}, last


def measure_train_steps(
  model: str,
  repeats: int,
  calls: int,
  *,
  n_tasks: int = 20,
  mem_per_task: int = 256,
  batch: int = 10,
  ref_batch: int = 256,
) -> dict:
  """One jitted SGD step, including the memory forward/backward, per method.

  sgd: the batch gradient. agem: plus the gradient on ``ref_batch`` memory
  samples. gem: plus the gradients of ``n_tasks`` tasks' memories
  (``mem_per_task`` samples each) in one ``vmap`` ped backward.
  """
  sizes = MODELS[model]
  params = mlp_params(sizes)
  data = _step_data(sizes, n_tasks, mem_per_task, batch, ref_batch)
  txs, steps = _projection_steps(n_tasks, *data)
  states = {k: tx.init(params) for k, tx in txs.items()}
  best, last = _best_times(steps, states, params, repeats, calls)
  return {
    "model": model,
    "n_tasks": n_tasks,
    "mem_per_task": mem_per_task,
    "ref_batch": ref_batch,
    "batch": batch,
    "sgd_step_us": 1e6 * best["sgd"],
    "agem_step_us": 1e6 * best["agem"],
    "gem_step_us": 1e6 * best["gem"],
    "agem_over_sgd": best["agem"] / best["sgd"],
    "gem_over_agem": best["gem"] / best["agem"],
    "agem_projected": bool(optax.tree.get(last["agem"], "agem_projected") > 0),
    "gem_projected": bool(optax.tree.get(last["gem"], "gem_projected") > 0),
  }
