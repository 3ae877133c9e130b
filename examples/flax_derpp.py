"""DER++ vs plain fine-tuning on class-incremental split Fashion-MNIST with a Flax NNX MLP.

Fashion-MNIST is split into 5 tasks of 2 classes (``cl_optax.streams.split``,
``scenario="class"``): one 10-way output layer, global labels, and at test
time every output competes (no task id). The model is an MLP
(784-256-256-10) trained with Adam, one pass per task. Both methods train on
the current batch with the cross-entropy over the classes seen so far
(``cl_optax.losses.seen_classes_mask`` / ``masked_cross_entropy``):

  finetune  Adam on the current batch only
  derpp     DER++ (Buzzega et al., NeurIPS 2020, Eq. 6), from the public parts:
            a reservoir memory (``cl_optax.replay``) of (x, y, logits) written
            with the logits of the forward pass; the loss adds
            alpha * ``cl_optax.losses.der_logit_mse`` on one memory sample, and
            ``chain(cl_optax.experience_replay(beta), adam)`` adds the gradient of
            the masked cross-entropy on a second memory sample with its labels.

It prints each method's accuracy matrix (mean over seeds), its final average
accuracy and average forgetting (``cl_optax.metrics``).

  python examples/flax_derpp.py --data /path/to/folder   # holding fashion_mnist.npz
  CL_OPTAX_DATA=/path/to/folder python examples/flax_derpp.py --seeds 3
  python examples/flax_derpp.py --data digits --small     # offline 8x8 digits, seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cl_optax
from cl_optax import losses, metrics, replay, streams

N_CLASSES, CLASSES_PER_TASK = 10, 2


class MLP(nnx.Module):
  """Two hidden ReLU layers and one 10-way output layer shared by every task."""

  def __init__(self, n_in: int, rngs: nnx.Rngs, hidden: int = 256):
    self.fc1 = nnx.Linear(n_in, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, N_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def load_stream(data: str | None, seed: int) -> streams.Stream:
  """Class-incremental split of Fashion-MNIST (``data``: a folder or .npz) or of ``digits``."""
  if data == "digits":
    ds = streams.load_digits()
    return streams.split(
      ds.x_train, ds.y_train, classes_per_task=CLASSES_PER_TASK, scenario="class", seed=seed
    )
  ds = streams.load_fashion_mnist(data)  # data=None: $CL_OPTAX_DATA
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  return streams.split(
    flat(ds.x_train),
    ds.y_train,
    classes_per_task=CLASSES_PER_TASK,
    scenario="class",
    test=(flat(ds.x_test), ds.y_test),
    seed=seed,
  )


def make_step(graphdef, tx, *, derpp: bool, alpha: float, mem_batch: int):
  """One jitted step: memory samples, the losses' gradients, the update, the memory write."""

  def logits(params, x):
    return nnx.merge(graphdef, params)(x)

  def loss(params, x, y, seen, mem):
    z = logits(params, x)
    total = losses.masked_cross_entropy(z, y, seen)
    if derpp:  # alpha: DER's logit replay on the first memory sample
      (m, valid) = mem
      total += alpha * losses.der_logit_mse(logits(params, m["x"]), m["logits"], weights=valid)
    return total, z

  def replay_loss(params, seen, mem):  # beta's term: the second sample with its labels
    (m, valid) = mem
    return losses.masked_cross_entropy(logits(params, m["x"]), m["y"], seen, weights=valid)

  @jax.jit
  def step(params, opt_state, memory, seen, x, y, key):
    k_der, k_ce, k_add = jax.random.split(key, 3)
    mem_der = replay.sample(memory, k_der, mem_batch)
    grads, z = jax.grad(loss, has_aux=True)(params, x, y, seen, mem_der)
    extra = {}
    if derpp:
      extra["replay_grads"] = jax.grad(replay_loss)(
        params, seen, replay.sample(memory, k_ce, mem_batch)
      )
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    memory = replay.add(memory, {"x": x, "y": y, "logits": z}, key=k_add)
    return params, opt_state, memory

  return step


@functools.partial(jax.jit, static_argnums=0)
def _correct(graphdef, params, x, y):
  return jnp.sum(jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y)


def accuracy(graphdef, params, x, y, chunk: int = 2000) -> float:
  """Class-IL accuracy: the argmax over every output."""
  hits = sum(
    int(_correct(graphdef, params, x[i : i + chunk], y[i : i + chunk]))
    for i in range(0, len(x), chunk)
  )
  return hits / len(x)


def run(method: str, stream, args, seed: int) -> np.ndarray:
  """Trains one method over the stream; returns the accuracy matrix R[i, j]."""
  rng = np.random.default_rng(seed)
  tasks = []
  for task in stream:
    (xtr, ytr), (xte, yte) = task.train(), task.test()
    i = rng.permutation(len(xtr))[: args.train_per_task]
    j = rng.permutation(len(xte))[: args.test_per_task]
    tasks.append((xtr[i], ytr[i], xte[j], yte[j], task.classes))
  model = MLP(tasks[0][0].shape[1], nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  derpp = method == "derpp"
  if derpp:
    tx = optax.chain(cl_optax.experience_replay(args.beta), optax.adam(args.lr))
  elif method == "finetune":
    tx = optax.adam(args.lr)
  else:
    raise ValueError(f"unknown method {method!r}")
  opt_state = tx.init(params)
  example = {
    "x": jnp.zeros(tasks[0][0].shape[1:], jnp.float32),
    "y": jnp.int32(0),
    "logits": jnp.zeros(N_CLASSES, jnp.float32),
  }
  memory = replay.init(example, args.memory)  # a Reservoir over the whole stream
  step = make_step(graphdef, tx, derpp=derpp, alpha=args.alpha, mem_batch=args.batch_size)
  key = jax.random.key(seed)
  seen = jnp.zeros(N_CLASSES, bool)
  R = np.zeros((len(tasks), len(tasks)))
  for t, (xtr, ytr, _, _, classes) in enumerate(tasks):
    seen = seen | losses.seen_classes_mask(jnp.asarray(classes), N_CLASSES)
    for _ in range(args.epochs):
      for xb, yb in streams.minibatches(xtr, ytr, args.batch_size, rng):
        key, sub = jax.random.split(key)
        params, opt_state, memory = step(params, opt_state, memory, seen, xb, yb, sub)
    for j, (_, _, xte, yte, _) in enumerate(tasks):
      R[t, j] = accuracy(graphdef, params, xte, yte)
  return R


def report(results: dict, header: str) -> None:
  print(header)
  for method, mats in results.items():
    print(f"\n{method}: accuracy matrix (%), row i = after task i, mean over seeds")
    print(np.array2string(100 * np.tril(np.mean(mats, 0)), precision=1, suppress_small=True))
  print(f"\n{'method':<10} {'ACC (%)':>16} {'forgetting (%)':>18}")
  for method, mats in results.items():
    acc = [100 * metrics.average_accuracy(R) for R in mats]
    fgt = [100 * metrics.forgetting(R) for R in mats]
    print(
      f"{method:<10} {np.mean(acc):>8.2f} ± {np.std(acc):5.2f}"
      f" {np.mean(fgt):>10.2f} ± {np.std(fgt):5.2f}"
    )


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--data",
    default=None,
    help="folder or .npz holding Fashion-MNIST (default: $CL_OPTAX_DATA), or 'digits' "
    "(scikit-learn's 8x8 digits, offline)",
  )
  parser.add_argument("--methods", default="finetune,derpp")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--train-per-task", type=int, default=None, help="default: all")
  parser.add_argument("--test-per-task", type=int, default=None, help="default: all")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--memory", type=int, default=500, help="reservoir slots")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--alpha", type=float, default=0.3, help="weight of the logit term")
  parser.add_argument("--beta", type=float, default=0.5, help="weight of the memory CE term")
  parser.add_argument(
    "--small", action="store_true", help="1000 train / 500 test examples per task (seconds)"
  )
  args = parser.parse_args(argv)
  if args.small:
    args.train_per_task = args.train_per_task or 1000
    args.test_per_task = args.test_per_task or 500
  if args.data is None and not os.environ.get(streams.ENV_VAR):
    parser.error(
      f"pass --data DIR (holding fashion_mnist.npz) or 'digits', or set ${streams.ENV_VAR}"
    )
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  results = {m: [] for m in args.methods.split(",")}
  for seed in range(args.seeds):
    stream = load_stream(args.data, seed)
    for method in results:
      results[method].append(run(method, stream, args, seed))
  name = "digits" if args.data == "digits" else "Fashion-MNIST"
  report(
    results,
    f"class-incremental split {name}: {len(stream)} tasks x {CLASSES_PER_TASK} classes, "
    f"{args.train_per_task or 'all'} train examples/task, {args.epochs} epoch(s), batch "
    f"{args.batch_size}, Adam lr {args.lr}, DER++ memory {args.memory} alpha {args.alpha} "
    f"beta {args.beta}, {args.seeds} seed(s), {time.perf_counter() - start:.0f} s on "
    f"{jax.devices()[0].platform}",
  )
  return results


if __name__ == "__main__":
  main()
