"""A-GEM vs plain SGD on permuted MNIST (or permuted digits) with a Flax NNX MLP.

The protocol follows the A-GEM / GEM papers in a small form: a stream of
tasks, each a fixed random pixel permutation of the images; one 10-way head
shared by all tasks; a single pass over 1000 training examples per task
(GEM's MNIST-permutations size), batch 10, plain SGD. The MLP is A-GEM's
FC-S (784-256-256-10). The episodic memory keeps the last 250 examples of
every task (``cl_optax.replay``, a per-task ring); at each step A-GEM's
reference gradient is the gradient on 256 examples drawn from the memories of
the earlier tasks, computed inside the same jitted step as the batch gradient
and the memory write:

  sgd    plain SGD (lr 0.03, A-GEM's tuned value for "VAN")
  agem   chain(cl_optax.agem(), sgd) (lr 0.1, the paper's)

It prints the mean accuracy matrix over seeds, the average accuracy after the
last task and the average forgetting.

  python examples/flax_agem.py --seeds 3            # MNIST when $CL_OPTAX_DATA has it
  python examples/flax_agem.py --data mnist --mnist path/to/mnist.npz
  python examples/flax_agem.py --data digits        # offline sklearn digits (8x8)

``--mnist PATH`` (a .npz or IDX folder, default ``$CL_OPTAX_DATA``) is read by
``cl_optax.streams.load_mnist``; without ``--data`` the script uses MNIST when it
finds it there and the digits otherwise.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cl_optax
from cl_optax import replay, streams

LRS = {"sgd": 0.03, "agem": 0.1, "gem": 0.1}  # A-GEM's replicate script (MNIST)


class MLP(nnx.Module):
  """A-GEM's FC-S: two hidden ReLU layers of 256 and one shared 10-way head."""

  def __init__(self, n_in: int, rngs: nnx.Rngs, hidden: int = 256, n_out: int = 10):
    self.fc1 = nnx.Linear(n_in, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, n_out, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


@functools.cache
def load(data: str, mnist_path: str | None = None):
  """Train and test images in [0, 1], flattened, with integer labels.

  ``data="mnist"``: ``streams.load_mnist(mnist_path)`` (``None``: ``$CL_OPTAX_DATA``).
  """
  if data == "mnist":
    ds = streams.load_mnist(mnist_path)  # FileNotFoundError names where it looked
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    return (flat(ds.x_train), ds.y_train.astype(np.int32)), (
      flat(ds.x_test),
      ds.y_test.astype(np.int32),
    )
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  idx = np.random.default_rng(0).permutation(len(x))
  cut = int(0.7 * len(x))
  return (x[idx[:cut]], y[idx[:cut]].astype(np.int32)), (
    x[idx[cut:]],
    y[idx[cut:]].astype(np.int32),
  )


def permuted_stream(
  data: str, n_tasks: int, n_train: int, n_test: int, seed: int, mnist_path: str | None = None
):
  """Per task: (train x, train y, test x, test y) under its own pixel permutation."""
  (xtr, ytr), (xte, yte) = load(data, mnist_path)
  rng = np.random.default_rng(seed)
  tasks = []
  for t in range(n_tasks):
    perm = np.arange(xtr.shape[1]) if t == 0 else rng.permutation(xtr.shape[1])
    i = rng.choice(len(xtr), min(n_train, len(xtr)), replace=False)
    j = rng.choice(len(xte), min(n_test, len(xte)), replace=False)
    tasks.append((xtr[i][:, perm], ytr[i], xte[j][:, perm], yte[j]))
  return tasks


def cross_entropy(logits, y, weights=None):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  if weights is None:
    return losses.mean()
  w = weights.astype(losses.dtype)
  return jnp.sum(w * losses) / jnp.maximum(jnp.sum(w), 1.0)  # 0 (and 0 grads) if empty


def make_agem_step(graphdef, tx, ref_batch: int):
  """SGD or A-GEM step: memory sample + reference gradient + update + memory write."""

  def loss(params, x, y, w=None):
    return cross_entropy(nnx.merge(graphdef, params)(x), y, w)

  @jax.jit
  def step(params, opt_state, memory, x, y, task, key):
    grads = jax.grad(loss)(params, x, y)
    past = jnp.arange(memory.written.shape[0]) < task
    (xm, ym), valid = replay.sample(memory, key, ref_batch, tasks=past)
    ref = jax.grad(loss)(params, xm, ym, valid)  # zeros on the first task
    updates, opt_state = tx.update(grads, opt_state, params, ref_grads=ref)
    params = optax.apply_updates(params, updates)
    return params, opt_state, replay.add(memory, (x, y), task=task)

  return step


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(graphdef, params, x, y):
  return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y)


def train(method: str, tasks, seed: int, make_step, mem_per_task: int, batch: int, lr: float):
  """Runs the stream once; returns the accuracy matrix R[i, j]."""
  n_tasks = len(tasks)
  model = MLP(tasks[0][0].shape[1], nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  if method == "sgd":
    tx = optax.sgd(lr)
  elif method == "agem":
    tx = optax.chain(cl_optax.agem(), optax.sgd(lr))
  elif method == "gem":
    tx = optax.chain(cl_optax.gem(strength=0.5, max_tasks=n_tasks), optax.sgd(lr))
  else:
    raise ValueError(f"unknown method {method!r}")
  step = make_step(method, graphdef, tx)
  opt_state = tx.init(params)
  x0, y0 = tasks[0][0][0], tasks[0][1][0]
  memory = replay.init((jnp.asarray(x0), jnp.asarray(y0)), mem_per_task, num_tasks=n_tasks)
  key = jax.random.key(seed)
  acc = np.zeros((n_tasks, n_tasks))
  for t, (xtr, ytr, _, _) in enumerate(tasks):
    for i in range(0, len(xtr) - batch + 1, batch):
      key, sub = jax.random.split(key)
      params, opt_state, memory = step(
        params, opt_state, memory, xtr[i : i + batch], ytr[i : i + batch], t, sub
      )
    for j, (_, _, xte, yte) in enumerate(tasks):
      acc[t, j] = float(_accuracy(graphdef, params, xte, yte))
  return acc


def average_forgetting(acc):
  """Chaudhry et al. 2018: mean over tasks 0..T-2 of max_l R[l, j] - R[T-1, j]."""
  n = acc.shape[0]
  return float(np.mean([acc[: n - 1, j].max() - acc[-1, j] for j in range(n - 1)]))


def report(results: dict, header: str):
  print(header)
  for method, mats in results.items():
    print(f"\n{method}: accuracy matrix (%), row i = after task i, mean over seeds")
    print(np.array2string(100 * np.tril(np.mean(mats, 0)), precision=1, suppress_small=True))
  print(f"\n{'method':<8} {'final avg accuracy (%)':>24} {'avg forgetting (%)':>20}  per seed")
  for method, mats in results.items():
    a = [100 * m[-1].mean() for m in mats]
    f = [100 * average_forgetting(m) for m in mats]
    print(
      f"{method:<8} {np.mean(a):>15.2f} ± {np.std(a):5.2f} {np.mean(f):>11.2f} ± {np.std(f):5.2f}"
      f"  {', '.join(f'{v:.2f}' for v in a)}"
    )


def parse_args(doc: str, methods: str, mem_per_task: int):
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--methods", default=methods)
  parser.add_argument("--data", choices=["mnist", "digits"], default=None)
  parser.add_argument(
    "--mnist",
    default=None,
    help=f"MNIST .npz or folder (with --data mnist; default ${streams.ENV_VAR})",
  )
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("--train-per-task", type=int, default=1000)
  parser.add_argument("--test-per-task", type=int, default=2000)
  parser.add_argument("--mem-per-task", type=int, default=mem_per_task)
  parser.add_argument("--batch-size", type=int, default=10)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument(
    "--lrs", default="", help=f"override learning rates, e.g. sgd=0.1,agem=0.1 (default: {LRS})"
  )
  args = parser.parse_args()
  for item in filter(None, args.lrs.split(",")):
    name, value = item.split("=")
    LRS[name] = float(value)
  if args.data is None:  # MNIST when --mnist / $CL_OPTAX_DATA has it, else the digits
    try:
      load("mnist", args.mnist)
      args.data = "mnist"
    except FileNotFoundError:
      args.data = "digits"
  return args


def run_all(args, make_step):
  results = {m: [] for m in args.methods.split(",")}
  start = time.perf_counter()
  for seed in range(args.seeds):
    tasks = permuted_stream(
      args.data, args.tasks, args.train_per_task, args.test_per_task, seed, args.mnist
    )
    for method in results:
      acc = train(method, tasks, seed, make_step, args.mem_per_task, args.batch_size, LRS[method])
      results[method].append(acc)
  report(
    results,
    f"permuted {args.data}: {args.tasks} tasks x {args.train_per_task} examples, one pass, "
    f"batch {args.batch_size}, SGD lr {', '.join(f'{m} {LRS[m]}' for m in results)}, "
    f"memory {args.mem_per_task}/task, {args.seeds} seeds, "
    f"{time.perf_counter() - start:.0f} s on {jax.devices()[0].platform}",
  )
  return results


def main():
  args = parse_args(__doc__, "sgd,agem", 250)
  run_all(args, lambda method, graphdef, tx: make_agem_step(graphdef, tx, ref_batch=256))


if __name__ == "__main__":
  main()
