"""SPG soft-masking in a Flax NNX loop on split digits (task-incremental).

scikit-learn's bundled 8x8 digits (offline) are split into 5 tasks of 2
classes; the MLP has one 2-way head per task (the columns of one output
layer), as SPG evaluates. It compares

  adam                  plain Adam
  soft_mask>adam        the gradient is masked before Adam
  adam>soft_mask        Adam's update is masked (the recommended order)

and prints, per method, the mean accuracy matrix over seeds, the average
accuracy after the last task and the average forgetting, then saves heatmaps.

  python examples/flax_soft_mask.py --seeds 3 --out results/demo
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _plots import save_heatmaps
from flax import nnx

import cl_optax
from cl_optax import metrics, streams

N_TASKS, CLASSES_PER_TASK = 5, 2


class MLP(nnx.Module):
  """64-256-256 trunk with a 2-way head per task (one shared output layer)."""

  def __init__(self, rngs: nnx.Rngs, hidden: int = 256):
    self.trunk1 = nnx.Linear(64, hidden, rngs=rngs)
    self.trunk2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, N_TASKS * CLASSES_PER_TASK, rngs=rngs)

  def __call__(self, x, task):
    h = jax.nn.relu(self.trunk2(jax.nn.relu(self.trunk1(x))))
    logits = self.head(h).reshape(x.shape[0], N_TASKS, CLASSES_PER_TASK)
    return jnp.take(logits, task, axis=1)


def split_digits(seed: int):
  """Five tasks of digits (0,1), (2,3), ...: task-incremental, local labels 0/1."""
  ds = streams.load_digits()
  return streams.split(
    ds.x_train, ds.y_train, classes_per_task=CLASSES_PER_TASK, scenario="task", seed=seed
  )


def make_tx(method: str, lr: float) -> optax.GradientTransformation:
  def head(params):  # labels: True on the task-head leaves (optax.masked style)
    return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).startswith("['head']"), params
    )

  if method == "adam":
    return optax.adam(lr)
  if method == "soft_mask>adam":
    return optax.chain(cl_optax.soft_mask(head=head), optax.adam(lr))
  if method == "adam>soft_mask":
    return optax.chain(optax.adam(lr), cl_optax.soft_mask(head=head))
  raise ValueError(f"unknown method {method!r}")


@nnx.jit(static_argnums=(4,))
def train_step(model, optimizer, x, y, task):
  def loss_fn(model):
    logits = model(x, task)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


@nnx.jit(static_argnums=(2,))
def accuracy(model, x, task, y):
  return jnp.mean(jnp.argmax(model(x, task), -1) == y)


def run(method: str, seed: int, epochs: int, lr: float, batch_size: int):
  """Trains one method over the stream; returns the accuracy matrix R."""
  tasks = [(task.train(), task.test()) for task in split_digits(seed)]
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_tx(method, lr), wrt=nnx.Param)
  graphdef, _ = nnx.split(model)

  def logits_fn(params, x, head):  # pure function for the importance estimator
    return nnx.merge(graphdef, params)(x, head)

  rng = np.random.default_rng(seed)
  acc = np.zeros((N_TASKS, N_TASKS))
  for t, ((xtr, ytr), _) in enumerate(tasks):
    for _ in range(epochs):
      for xb, yb in streams.minibatches(xtr, ytr, batch_size, rng):
        train_step(model, optimizer, xb, yb, t)
    for j, (_, (xte, yte)) in enumerate(tasks):
      acc[t, j] = float(accuracy(model, xte, j, yte))
    if method != "adam":
      params = nnx.state(model, nnx.Param)
      imp = cl_optax.importance.spg(
        logits_fn,
        params,
        cl_optax.importance.stack_batches(streams.minibatches(xtr, ytr, batch_size, rng)),
        task=t,
      )
      cl_optax.consolidate(optimizer, params, importance=imp)
  return acc


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="adam,soft_mask>adam,adam>soft_mask")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/demo"))
  args = parser.parse_args()

  results = {}
  print(
    f"split digits: {N_TASKS} tasks x {CLASSES_PER_TASK} classes, task-incremental,"
    f" {args.epochs} epochs/task, {args.seeds} seeds, JAX on {jax.devices()[0].platform}"
  )
  for method in args.methods.split(","):
    start = time.perf_counter()
    results[method] = [
      run(method, s, args.epochs, args.lr, args.batch_size) for s in range(args.seeds)
    ]
    mean = np.mean(results[method], 0)
    print(
      f"\n{method}  ({time.perf_counter() - start:.1f} s) accuracy matrix (%),"
      " row i = after task i, mean over seeds:"
    )
    print(np.array2string(100 * np.tril(mean), precision=1, suppress_small=True))

  print(f"\n{'method':<16} {'avg accuracy (%)':>18} {'avg forgetting (%)':>20}")
  for method, mats in results.items():
    a = [100 * metrics.average_accuracy(m) for m in mats]
    f = [100 * metrics.forgetting(m) for m in mats]
    print(
      f"{method:<16} {np.mean(a):>11.2f} ± {np.std(a):4.2f} {np.mean(f):>13.2f} ± {np.std(f):4.2f}"
    )
  path = save_heatmaps(results, args.out, vmin=0.5, lower_only=True)
  print(f"\nplots: {path}")


if __name__ == "__main__":
  main()
