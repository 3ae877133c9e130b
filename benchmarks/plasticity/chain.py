"""The stability-plasticity chain: SI alone, continual backprop alone, both chained.

Permuted MNIST with a test set (each task's composed permutation applied to
the 10 000 test images), 784-100-100-100-10 ReLU, SGD, batch 10; after each
task ``cl_optax.consolidate`` (SI's boundary) and the test accuracy on every
task seen: the accuracy matrix, ACC / BWT, and the accuracy on the task just
learnt (plasticity).

  python -m benchmarks.plasticity.chain --tasks 20 --per-task 10000 \\
    --out benchmarks/figures/plasticity/chain.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.plasticity.common import init_mlp, mlp, unit_layers
from cl_optax import metrics, streams

SIZES = (784, 100, 100, 100, 10)


def make_tx(method, lr, si_strength, rho):
  base = optax.sgd(lr)
  if method in ("si", "si+cbp"):
    base = optax.chain(cl_optax.si(si_strength), base)
  if method in ("cbp", "si+cbp"):
    return cl_optax.continual_backprop(
      base, layers=unit_layers(len(SIZES) - 1), replacement_rate=rho, maturity_threshold=100
    )
  return base


def train_task_fn(tx, stream, steps, batch, uses_acts):
  def loss_fn(p, x, y):
    out, hs = mlp(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), (out, hs)

  def step(carry, _):
    params, opt_state, cursor = carry
    cursor, x, y, _ = stream.take(cursor, batch)
    (_, (out, hs)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    extra = {"activations": hs} if uses_acts else {}
    updates, opt_state = tx.update(g, opt_state, params, **extra)
    correct = jnp.mean((jnp.argmax(out, -1) == y).astype(jnp.float32))
    return (optax.apply_updates(params, updates), opt_state, cursor), correct

  @jax.jit
  def train(params, opt_state, cursor):
    cursor = stream.start_task(cursor)
    (params, opt_state, cursor), correct = jax.lax.scan(
      step, (params, opt_state, cursor), None, length=steps
    )
    return params, opt_state, cursor, correct.mean()

  return train


@jax.jit
def accuracy(params, x, y, perm):
  return jnp.mean((jnp.argmax(mlp(params, x[:, perm])[0], -1) == y).astype(jnp.float32))


def run(method, a, x, y, xt, yt, log):
  stream = streams.online_permuted(x, y, examples_per_task=a.per_task, seed=a.seed)
  tx = make_tx(method, a.lr, a.si_strength, a.rho)
  params = init_mlp(jax.random.PRNGKey(a.seed), SIZES)
  opt_state, cursor = tx.init(params), stream.init()
  train = train_task_fn(tx, stream, a.per_task // a.batch, a.batch, "cbp" in method)
  R = np.zeros((a.tasks, a.tasks))
  perms, online = [], []
  t0 = time.perf_counter()
  for t in range(a.tasks):
    params, opt_state, cursor, acc = train(params, opt_state, cursor)
    online.append(float(acc))
    perms.append(cursor.perm_pixels)
    if "si" in method:
      opt_state = cl_optax.consolidate(opt_state, params)
    for j in range(t + 1):
      R[t, j] = float(accuracy(params, xt, yt, perms[j]))
    log(
      f"{method}: task {t}: online {online[-1]:.4f} test new {R[t, t]:.4f} "
      f"mean {R[t, : t + 1].mean():.4f} ({time.perf_counter() - t0:.0f} s)"
    )
  wall = time.perf_counter() - t0
  return {
    "R": R.tolist(),
    "online": online,
    **metrics.summary(R),
    "wall_s": wall,
    "samples_per_s": a.tasks * a.per_task / wall,
    "new_task_acc": np.diag(R).tolist(),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--methods", default="bp,si,cbp,si+cbp")
  ap.add_argument("--tasks", type=int, default=20)
  ap.add_argument("--per-task", type=int, default=10_000)
  ap.add_argument("--batch", type=int, default=10)
  ap.add_argument("--lr", type=float, default=0.01)
  ap.add_argument("--si-strength", type=float, default=0.2, help="2c, c = 0.1 (Zenke)")
  ap.add_argument("--rho", type=float, default=1e-4)
  ap.add_argument("--seed", type=int, default=0)
  data = os.environ.get("CL_OPTAX_DATA", "/work/shared/data")
  ap.add_argument("--data", default=data + "/mnist.npz")
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  d = np.load(a.data)
  x, xt = (
    jnp.asarray(d[k].reshape(len(d[k]), -1) / 255.0, jnp.float32) for k in ("x_train", "x_test")
  )
  y, yt = (jnp.asarray(d[k], jnp.int32) for k in ("y_train", "y_test"))
  results = {}
  for m in a.methods.split(","):
    results[m] = run(m, a, x, y, xt, yt, lambda s: print(s, file=sys.stderr, flush=True))
    with open(a.out, "w") as f:
      json.dump({"meta": vars(a), "results": results}, f)


if __name__ == "__main__":
  main()
