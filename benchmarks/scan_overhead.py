"""The runner's per-task scan vs a bare jitted scan of SGD steps (same model and data).

  python -m benchmarks.scan_overhead

Prints samples/s and the ratio to the bare scan (min over interleaved repeats), for
the runner's step with progress ticks, without, and with the padded-step `lax.cond`
(used only when the tasks of a stream have different numbers of steps), and for an
A-GEM-shaped step (a 256-example reference gradient per step, projected). The shapes
are one task of the A-GEM protocol: 5500 steps of batch 10, MLP 784-256-256-10.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import continual as c


def _no_bar(n):
  """The runner's tick callback when no progress bar is open."""


def _bare_scan(tx, X, Y, idx):
  """A jitted ``lax.scan`` of plain SGD steps on ``X[idx[i]], Y[idx[i]]``."""

  @jax.jit
  def bare(p, s):
    def body(carry, b):
      p, s = carry
      loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        c.mlp_apply(q, X[b]), Y[b]
      ).mean()
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (p, s), idx)[0]

  return bare


def _agem_shaped(tx, mem_x, mem_y):
  """An A-GEM-shaped method: a reference gradient on the memory examples inside the same
  jitted step, passed as an extra arg to a projection chained before ``tx``."""

  def ref_step(s):
    g = jax.grad(s.loss_fn)(s.params, mem_x, mem_y, jnp.zeros(len(mem_y), jnp.int32))
    return {"ref_grads": g}, s.aux

  def update(u, state, params=None, *, ref_grads=None, **extra):
    dot, nn = optax.tree.vdot(u, ref_grads), optax.tree.vdot(ref_grads, ref_grads)
    coef = jnp.where(dot < 0, dot / jnp.maximum(nn, 1e-12), 0.0)
    return jax.tree.map(lambda a, r: a - coef * r, u, ref_grads), state

  project = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  agem_tx = optax.chain(project, tx)
  return c.Method("agem-shaped", lambda h: agem_tx, step=ref_step), agem_tx


def _runner_scan(method, tx, params, data, task, ticks, padded):
  """The runner's compiled per-task scan (``make_train``) on ``data = (X, Y, idx)``."""
  X, Y, idx = data
  cols, valid = jnp.tile(jnp.arange(10), (17, 1)), jnp.ones((17, 10), bool)
  f = c.make_train(method, tx, ticks_every=ticks, on_tick=_no_bar, padded=padded)
  args = (params, tx.init(params), None, jax.random.key(0), X, Y, idx,
          jnp.ones(idx.shape[0], bool), jnp.int32(task), cols, valid)  # fmt: skip
  compiled = f.lower(*args).compile()
  return lambda: compiled(*args)


def _min_times(fns: dict, repeats: int) -> dict:
  """Min over interleaved repeats of each function's time (after one warm-up call)."""
  times = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f())
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: min(v) for k, v in times.items()}


def main(steps=5500, batch=10, repeats=3):
  tx = optax.sgd(0.03)
  params = c.mlp_init(jax.random.key(0), (784, 256, 256, 10))
  n = steps * batch
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.random((n, 784), dtype=np.float32))
  Y = jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))
  idx = jnp.asarray(rng.permutation(n).reshape(steps, batch).astype(np.int32))
  bare = _bare_scan(tx, X, Y, idx)
  fns = {"bare scan": lambda: bare(params, tx.init(params))}
  variants = {"runner": (steps // 50, False), "runner, no ticks": (0, False),
              "runner, padded": (steps // 50, True)}  # fmt: skip
  for name, (ticks, padded) in variants.items():
    fns[name] = _runner_scan(c.METHODS["sgd"], tx, params, (X, Y, idx), 0, ticks, padded)
  method, agem_tx = _agem_shaped(tx, X[:256], Y[:256])
  fns["runner, A-GEM step"] = _runner_scan(
    method, agem_tx, params, (X, Y, idx), 1, steps // 50, False
  )
  times = _min_times(fns, repeats)
  print(f"{steps} steps of batch {batch}, MLP 784-256-256-10, {jax.devices()[0]}")
  for k, t in times.items():
    print(f"{k:<20}{steps * batch / t:>10.0f} samples/s{t / times['bare scan']:>8.2f} x bare")


if __name__ == "__main__":
  main()
