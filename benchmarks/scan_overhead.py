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


def main(steps=5500, batch=10, repeats=3):
  tx = optax.sgd(0.03)
  params = c.mlp_init(jax.random.key(0), (784, 256, 256, 10))
  n = steps * batch
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.random((n, 784), dtype=np.float32))
  Y = jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))
  idx = jnp.asarray(rng.permutation(n).reshape(steps, batch).astype(np.int32))
  cols, valid = jnp.tile(jnp.arange(10), (17, 1)), jnp.ones((17, 10), bool)

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

  fns = {"bare scan": lambda: bare(params, tx.init(params))}
  variants = {"runner": (steps // 50, False), "runner, no ticks": (0, False),
              "runner, padded": (steps // 50, True)}  # fmt: skip
  for name, (ticks, padded) in variants.items():
    f = c.make_train(c.METHODS["sgd"], tx, ticks_every=ticks, on_tick=_no_bar, padded=padded)
    args = (params, tx.init(params), None, jax.random.key(0), X, Y, idx, jnp.ones(steps, bool),
            jnp.int32(0), cols, valid)  # fmt: skip
    compiled = f.lower(*args).compile()
    fns[name] = lambda compiled=compiled, args=args: compiled(*args)
  # An A-GEM-shaped step: a reference gradient on 256 memory examples inside the same
  # jitted step, passed as an extra arg to a projection (cl_optax.agem once merged).
  mem_x, mem_y = X[:256], Y[:256]

  def ref_step(s):
    g = jax.grad(s.loss_fn)(s.params, mem_x, mem_y, jnp.zeros(256, jnp.int32))
    return {"ref_grads": g}, s.aux

  def project():
    def update(u, state, params=None, *, ref_grads=None, **extra):
      dot, nn = optax.tree.vdot(u, ref_grads), optax.tree.vdot(ref_grads, ref_grads)
      coef = jnp.where(dot < 0, dot / jnp.maximum(nn, 1e-12), 0.0)
      return jax.tree.map(lambda a, r: a - coef * r, u, ref_grads), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  agem_tx = optax.chain(project(), tx)
  method = c.Method("agem-shaped", lambda h: agem_tx, step=ref_step)
  f = c.make_train(method, agem_tx, ticks_every=steps // 50, on_tick=_no_bar)
  args = (params, agem_tx.init(params), None, jax.random.key(0), X, Y, idx, jnp.ones(steps, bool),
          jnp.int32(1), cols, valid)  # fmt: skip
  compiled = f.lower(*args).compile()
  fns["runner, A-GEM step"] = lambda compiled=compiled, args=args: compiled(*args)
  times = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f())
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  base = min(times["bare scan"])
  print(f"{steps} steps of batch {batch}, MLP 784-256-256-10, {jax.devices()[0]}")
  for k, v in times.items():
    print(f"{k:<20}{steps * batch / min(v):>10.0f} samples/s{min(v) / base:>8.2f} x bare")


if __name__ == "__main__":
  main()
