"""Shared pieces of the permuted-stream examples (flax_ncl.py, flax_ewc.py).

Permuted digits: scikit-learn's bundled 8x8 digits (offline), each task a fixed
random permutation of the 64 pixels (task 0: the identity), all 10 classes, one
shared head (domain-incremental, like permuted MNIST). ``--data mnist`` uses MNIST
instead (784 pixels): ``--mnist PATH`` (a .npz or IDX folder), default ``$CL_OPTAX_DATA``.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _plots import save_heatmaps
from flax import nnx

from cl_optax import importance, metrics, streams

LAYERS = ("l0", "l1", "l2")


class MLP(nnx.Module):
  """in-H-H-10 ReLU MLP; ``taps`` (zeros added to each layer's output) for K-FAC."""

  def __init__(self, d_in: int, hidden: int, rngs: nnx.Rngs):
    self.l0 = nnx.Linear(d_in, hidden, rngs=rngs)
    self.l1 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x, taps=None):
    inputs, h = {}, x
    for i, name in enumerate(LAYERS):
      inputs[name] = h
      h = getattr(self, name)(h)
      if taps is not None:
        h = h + taps[name]
      if i < len(LAYERS) - 1:
        h = jax.nn.relu(h)
    return h if taps is None else (h, inputs)


def load(data: str, mnist_path: str | None, n_train: int | None):
  if data == "digits":  # no official test split: hold out 20 %
    x, y = streams.load_digits()[:2]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])
  ds = streams.load_mnist(mnist_path)  # None: $CL_OPTAX_DATA
  n = n_train or len(ds.x_train)
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  return (flat(ds.x_train[:n]), ds.y_train[:n]), (flat(ds.x_test), ds.y_test)


def permuted_stream(train, test, n_tasks: int, seed: int):
  d = train[0].shape[1]
  rng = np.random.default_rng(1000 + seed)
  perms = [np.arange(d)] + [rng.permutation(d) for _ in range(n_tasks - 1)]
  return [
    ((train[0][:, p], train[1].astype(np.int32)), (test[0][:, p], test[1].astype(np.int32)))
    for p in perms
  ]


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  optimizer.update(model, nnx.grad(loss_fn)(model))


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def fisher_batches(x, y, batch_size=64):
  """``(x, y)`` as ``Batches`` of ``[n_batches, batch_size, ...]`` for the importance estimators."""
  n = len(x) // batch_size * batch_size
  return importance.Batches(
    x[:n].reshape(-1, batch_size, x.shape[1]), y[:n].reshape(-1, batch_size)
  )


def run(
  tasks,
  make_tx: Callable[[int], optax.GradientTransformation],
  end_task: Callable | None,
  *,
  seed: int,
  epochs: int,
  batch_size: int,
  hidden: int,
):
  """Trains over the stream; ``end_task(optimizer, model, graphdef, (x, y), t)`` consolidates."""
  model = MLP(tasks[0][0][0].shape[1], hidden, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, make_tx(len(tasks[0][0][0])), wrt=nnx.Param)
  graphdef, _ = nnx.split(model)
  rng = np.random.default_rng(seed)
  acc = np.zeros((len(tasks), len(tasks)))
  for t, ((xtr, ytr), _) in enumerate(tasks):
    for _ in range(epochs):
      for xb, yb in streams.minibatches(xtr, ytr, batch_size, rng):
        train_step(model, optimizer, xb, yb)
    for j, (_, (xte, yte)) in enumerate(tasks):
      acc[t, j] = float(accuracy(model, xte, yte))
    if end_task is not None and t < len(tasks) - 1:
      end_task(optimizer, model, graphdef, (xtr, ytr), t)
  return acc


def report(results: dict, elapsed: dict, out: pathlib.Path | None):
  for method, mats in results.items():
    mean = np.mean(mats, 0)
    print(
      f"\n{method}  ({elapsed[method]:.1f} s) accuracy matrix (%), row i = after task i,"
      " mean over seeds:"
    )
    print(np.array2string(100 * mean, precision=1, suppress_small=True))
  print(f"\n{'method':<12} {'avg accuracy (%)':>18} {'BWT (%)':>16}")
  for method, mats in results.items():
    a = [100 * metrics.average_accuracy(m) for m in mats]
    b = [100 * metrics.backward_transfer(m) for m in mats]
    print(
      f"{method:<12} {np.mean(a):>11.2f} ± {np.std(a):4.2f} {np.mean(b):>9.2f} ± {np.std(b):4.2f}"
    )
  if out is not None:
    path = save_heatmaps(results, out)
    print(f"\nplots: {path}")


def main_loop(methods: dict, args):
  """methods: name -> (make_tx(data_size), end_task or None)."""
  train, test = load(args.data, args.mnist, args.n_train)
  print(
    f"permuted {args.data}: {args.tasks} tasks x 10 classes (one shared head), "
    f"{args.epochs} epochs/task, {args.seeds} seeds, JAX on {jax.devices()[0].platform}"
  )
  results, elapsed = {}, {}
  for name in args.methods.split(","):
    make_tx, end_task = methods[name]
    start = time.perf_counter()
    results[name] = [
      run(
        permuted_stream(train, test, args.tasks, s),
        make_tx,
        end_task,
        seed=s,
        epochs=args.epochs,
        batch_size=args.batch_size,
        hidden=args.hidden,
      )
      for s in range(args.seeds)
    ]
    elapsed[name] = time.perf_counter() - start
  report(results, elapsed, args.out)
  return results


def add_common_args(parser, methods: str):
  parser.add_argument("--methods", default=methods)
  parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
  parser.add_argument(
    "--mnist",
    default=None,
    help=f"MNIST .npz or folder (with --data mnist; default ${streams.ENV_VAR})",
  )
  parser.add_argument("--n-train", type=int, default=None, help="MNIST examples per task")
  parser.add_argument("--tasks", type=int, default=5)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--out", type=pathlib.Path, default=None)
