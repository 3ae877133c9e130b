"""The MNIST and digits streams of the presets (``protocols.PRESETS``), and ``--n-train`` /
``--n-test`` caps. Each builder is ``(data, scenario, seed) -> Stream``; ``data`` is the
MNIST ``.npz`` or its folder (``None``: ``$CL_OPTAX_DATA``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from cl_optax import streams


@functools.lru_cache(maxsize=2)
def _mnist(path):
  return streams.load_mnist(path)


def digits_split(data, scenario, seed):
  ds = streams.load_digits()
  return streams.split(ds.x_train, ds.y_train, classes_per_task=2, scenario=scenario, seed=seed)


def mnist_split(data, scenario, seed, shuffle_classes=False):
  ds = _mnist(data)
  groups = None
  if shuffle_classes:  # van de Ven's code: a random digit -> task assignment per seed
    perm = np.random.default_rng(seed).permutation(10)
    groups = [tuple(int(c) for c in perm[i : i + 2]) for i in range(0, 10, 2)]
  return streams.split(
    ds.x_train, ds.y_train, classes_per_task=2, groups=groups, scenario=scenario,
    test=(ds.x_test, ds.y_test), seed=seed,
  )  # fmt: skip


def mnist_permuted(n_tasks, n_train, first_identity=False, skip=0):
  def make(data, scenario, seed):
    ds = _mnist(data)
    return streams.permuted(
      ds.x_train[skip:], ds.y_train[skip:], n_tasks=n_tasks, test=(ds.x_test, ds.y_test), seed=seed,
      first_identity=first_identity, n_train=n_train,
    )  # fmt: skip

  return make


def mnist_permuted_task_il(n_tasks, n_train):
  """Permuted MNIST with one 10-way head per task (task-IL): task t reads columns 10t..10t+9
  (the isolation papers' protocol: WSN's ``mlp.py`` and HAT's ``pmnist`` give each task a head)."""

  def make(data, scenario, seed):
    stream = mnist_permuted(n_tasks, n_train)(data, scenario, seed)
    k = stream.columns.shape[1]
    columns = np.arange(n_tasks * k, dtype=np.int32).reshape(n_tasks, k)
    return dataclasses.replace(
      stream, name=stream.name + ", a head per task", scenario="task", n_outputs=n_tasks * k,
      columns=columns, train_valid=np.ones_like(columns, bool),
    )  # fmt: skip

  return make


def cap_stream(stream: streams.Stream, n_train: int | None, n_test: int | None, seed: int):
  """At most ``n_train`` training examples per task (a random subset, from ``seed``) and the
  first ``n_test`` test examples (``--n-train`` / ``--n-test``: a CPU-sized protocol)."""
  if n_train is None and n_test is None:
    return stream
  rng = np.random.default_rng(seed)

  def capped(task, n, index, size):
    rows = np.arange(size) if index is None else index
    if n is None or n >= len(rows):
      return rows
    return np.sort(rng.permutation(rows)[:n]) if task else rows[:n]

  tasks = tuple(
    dataclasses.replace(
      t,
      train_index=capped(True, n_train, t.train_index, len(t.y_train)),
      test_index=capped(False, n_test, t.test_index, len(t.y_test)),
    )  # fmt: skip
    for t in stream.tasks
  )
  return dataclasses.replace(stream, tasks=tasks)


def mnist_rotated(n_tasks, n_train):
  def make(data, scenario, seed):
    ds = _mnist(data)
    return streams.rotated(
      ds.x_train, ds.y_train, n_tasks=n_tasks, max_degrees=180.0, test=(ds.x_test, ds.y_test),
      seed=seed, n_train=n_train, interpolation="nearest",
    )  # fmt: skip

  return make


def mnist_rotated_uniform(n_tasks):
  """Rotated MNIST, one angle per task drawn from U(0, 180) degrees with the seed (the DER
  paper's R-MNIST: mammoth ``transforms/rotation.py``, a fresh ``Rotation`` per task),
  every training example in each task, nearest-neighbour interpolation."""

  def make(data, scenario, seed):
    ds = _mnist(data)
    angles = np.random.default_rng(seed).uniform(0.0, 180.0, size=n_tasks)
    return streams.rotated(
      ds.x_train, ds.y_train, angles=[float(a) for a in angles], test=(ds.x_test, ds.y_test),
      seed=seed, interpolation="nearest",
    )  # fmt: skip

  return make
