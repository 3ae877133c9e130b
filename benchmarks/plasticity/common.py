"""Nets, methods and the scanned online training loop of the plasticity benchmarks.

One run = one jitted ``lax.scan`` over bins (tasks) with an inner scan over
batch-1 steps; ``jax.vmap`` over runs (seeds). After each bin: the bin's
mean metric and the health measures on a probe batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from cl_optax import metrics


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  """He-uniform kernels (PyTorch ``kaiming_uniform_`` for ReLU, the official init), zero biases."""
  keys = jax.random.split(key, len(sizes) - 1)
  he = jax.nn.initializers.he_uniform()
  return {
    f"l{i + 1}": {"kernel": he(k, (a, b), jnp.float32), "bias": jnp.zeros((b,), jnp.float32)}
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp(params: dict, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
  """``(outputs, hidden post-ReLU activations)``."""
  n = len(params)
  hs = []
  for i in range(1, n):
    x = jax.nn.relu(x @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"])
    hs.append(x)
  return x @ params[f"l{n}"]["kernel"] + params[f"l{n}"]["bias"], hs


def unit_layers(n_layers: int) -> list[tuple[str, str, str, str]]:
  """CBP/ReDo layer specs of every hidden layer of an ``n_layers`` MLP (next bias included)."""
  return [
    (f"l{i}/kernel", f"l{i}/bias", f"l{i + 1}/kernel", f"l{i + 1}/bias") for i in range(1, n_layers)
  ]


def make_tx(spec: dict, n_layers: int) -> optax.GradientTransformation:
  """The optimiser of a method spec (``{"method": ..., "lr": ..., ...}``)."""
  m, lr = spec["method"], spec["lr"]
  sgd = optax.sgd(lr)
  if m in ("bp", "linear"):
    return sgd
  if m == "adam":
    return optax.adam(lr)
  if m == "l2":
    return optax.chain(optax.add_decayed_weights(spec["wd"]), sgd)
  if m == "snp":
    return optax.chain(
      optax.add_decayed_weights(spec["wd"]), sgd, cl_optax.param_noise(spec["sigma"])
    )
  if m == "l2init":
    return optax.chain(cl_optax.l2_init(spec["strength"]), sgd)
  layers = unit_layers(n_layers)
  if m == "cbp":
    return cl_optax.continual_backprop(
      sgd, layers=layers, replacement_rate=spec["rho"], maturity_threshold=spec["mt"]
    )
  if m == "redo":
    return cl_optax.redo(
      sgd, layers=[s[:3] for s in layers], threshold=spec["tau"], every=spec["every"]
    )
  raise ValueError(f"unknown method {m!r}")


def _activations(spec, params, count, stats, hs):
  """The ``activations=``: the batch's (CBP), a statistics batch on recycle steps (ReDo)."""
  if spec["method"] == "cbp":
    return {"activations": hs}
  if spec["method"] != "redo":
    return {}
  every = spec["every"]
  acts = jax.lax.cond(
    (count + 1) % every == 0,
    lambda: mlp(params, stats())[1],
    lambda: [jnp.zeros((spec["stats_batch"], h.shape[-1]), h.dtype) for h in hs],
  )
  return {"activations": acts}


def make_run(
  spec: dict,
  sizes: tuple[int, ...],
  make_problem: Callable[[jax.Array], Any],
  draw: Callable[[Any, Any], tuple[Any, jax.Array, jax.Array]],
  score: Callable[[jax.Array, jax.Array], jax.Array],
  probe: Callable[[Any, Any, jax.Array], jax.Array],
  per_bin: int,
  start: Callable[[Any, Any], Any] = lambda problem, cursor: cursor,
) -> tuple[Callable, Callable]:
  """``(init(seed), run_bins(carry, seed, n_bins))`` for one method on one problem.

  ``make_problem(seed)`` builds the stream; ``draw(problem, cursor) -> (cursor,
  x, y)``; ``score(out, y)`` the per-example metric (before the update);
  ``probe(problem, cursor, key)`` a batch of inputs for the health measures
  and ReDo's statistics; ``start(problem, cursor)`` runs at each bin's start
  (a new task where bins are tasks).
  """
  n_layers = len(sizes) - 1
  tx = make_tx(spec, n_layers)

  def loss_fn(params, x, y):
    out, hs = mlp(params, x)
    if out.shape[-1] == 1:
      loss = jnp.mean((out[:, 0] - y) ** 2)
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return loss, (out, hs)

  def init(seed):
    params = init_mlp(jax.random.fold_in(jax.random.PRNGKey(seed), 7), sizes)
    return params, tx.init(params), make_problem(seed).init(), jnp.zeros((), jnp.int32)

  def step(problem, carry, _):
    params, opt_state, cursor, count = carry
    cursor, x, y = draw(problem, cursor)
    (_, (out, hs)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)

    def stats():
      return probe(problem, cursor, jax.random.PRNGKey(count))[: spec.get("stats_batch")]

    extra = _activations(spec, params, count, stats, hs)
    updates, opt_state = tx.update(g, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, cursor, count + 1), score(out, y)[0]

  def one_bin(problem, carry, _):
    carry = (*carry[:2], start(problem, carry[2]), carry[3])
    carry, per_example = jax.lax.scan(lambda c, u: step(problem, c, u), carry, None, length=per_bin)
    params, cursor = carry[0], carry[2]
    hs = mlp(params, probe(problem, cursor, jax.random.PRNGKey(carry[3])))[1]
    kernels = [params[f"l{i}"]["kernel"] for i in range(1, n_layers + 1)]
    health = {
      "dead": jnp.mean(jnp.stack([metrics.dead_fraction(h) for h in hs])) if hs else jnp.zeros(()),
      "erank": metrics.effective_rank(hs[-1]) if hs else jnp.zeros(()),
      "weight": metrics.mean_weight_magnitude(kernels),
    }
    return carry, {"metric": per_example.mean(), **health}

  def run_bins(carry, seed, n_bins):
    problem = make_problem(seed)
    return jax.lax.scan(lambda c, u: one_bin(problem, c, u), carry, None, length=n_bins)

  return init, run_bins


def _runner(init, run_bins, vmap_runs):
  """``(groups(seeds), make(group), call(carry, group, k))``: vmapped, or one seed at a time.

  Under ``vmap`` every ``lax.cond`` with a per-run predicate (a new task, a
  reset step) becomes a ``select`` running both branches at every step, so
  the permuted-MNIST runs go one seed at a time.
  """
  if vmap_runs:
    call = jax.jit(jax.vmap(run_bins, in_axes=(0, 0, None)), static_argnums=2, donate_argnums=0)
    return (lambda seeds: [seeds]), jax.vmap(init), call
  one = jax.jit(run_bins, static_argnums=2, donate_argnums=0)

  def call1(carry, group, k):
    carry, rec = one(carry, group[0], k)
    return carry, jax.tree.map(lambda a: a[None], rec)

  return (
    (lambda seeds: [seeds[i : i + 1] for i in range(len(seeds))]),
    (lambda g: init(g[0])),
    call1,
  )


def run_method(spec, problem, per_bin, n_bins, seeds, chunk, log, vmap_runs=True):
  """``n_bins`` bins for every seed, ``chunk`` bins per jitted call, as a dict.

  ``problem``: the keyword arguments of :func:`make_run` but ``spec`` and ``per_bin``.
  """
  init, run_bins = make_run(spec, per_bin=per_bin, **problem)
  groups, make, call = _runner(init, run_bins, vmap_runs)
  seeds = jnp.asarray(seeds, jnp.int32)
  per_group: list[dict] = []
  t0 = time.perf_counter()
  timed = []  # (bins x runs, seconds) of each call; the first of a group compiles
  for group in groups(seeds):
    carry, out, done = make(group), {}, 0
    while done < n_bins:
      k = min(chunk, n_bins - done)
      t1 = time.perf_counter()
      carry, rec = call(carry, group, k)
      rec = jax.device_get(rec)
      if done or k == n_bins:
        timed.append((k * len(group), time.perf_counter() - t1))
      for name, v in rec.items():
        out.setdefault(name, []).append(v)
      done += k
      log(
        f"{spec['name']} seeds {group.tolist()}: {done}/{n_bins} bins, "
        f"{time.perf_counter() - t0:.0f} s"
      )
    per_group.append({name: np.concatenate(v, axis=1) for name, v in out.items()})
  wall = time.perf_counter() - t0
  result = {n: np.concatenate([g[n] for g in per_group]).tolist() for n in per_group[0]}
  rate = sum(k for k, _ in timed) * per_bin / sum(t for _, t in timed)
  return {
    **result,
    "spec": spec,
    "seeds": [int(s) for s in seeds],
    "wall_s": wall,
    "samples_per_s": rate,
  }
