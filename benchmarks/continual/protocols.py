"""Protocols: the presets (data, stream, model, optimiser).

A new preset is one `PRESETS` entry plus, where a paper tuned a method for it, rows
of `paper_settings.SETTINGS`; no method entry changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from cl_optax import streams


class Preset(NamedTuple):
  """A protocol: data, stream, model and optimiser settings."""

  doc: str
  # (data, scenario, seed) -> Stream; data: the MNIST .npz or folder (None: $CL_OPTAX_DATA)
  stream: Callable[[str | None, str, int], streams.Stream]
  hidden: tuple[int, ...]
  optimizer: str
  lr: dict  # per base optimiser
  batch_size: int
  epochs: int | None = 1
  iters: int | None = None  # iterations per task (overrides epochs)
  bias: bool = True
  scenario: str | None = None  # default scenario of split streams
  init: str = "torch"  # parameter init (model.mlp_init); --init overrides


@functools.lru_cache(maxsize=2)
def _mnist(path):
  return streams.load_mnist(path)


def _digits_split(data, scenario, seed):
  ds = streams.load_digits()
  return streams.split(ds.x_train, ds.y_train, classes_per_task=2, scenario=scenario, seed=seed)


def _mnist_split(data, scenario, seed, shuffle_classes=False):
  ds = _mnist(data)
  groups = None
  if shuffle_classes:  # van de Ven's code: a random digit -> task assignment per seed
    perm = np.random.default_rng(seed).permutation(10)
    groups = [tuple(int(c) for c in perm[i : i + 2]) for i in range(0, 10, 2)]
  return streams.split(
    ds.x_train, ds.y_train, classes_per_task=2, groups=groups, scenario=scenario,
    test=(ds.x_test, ds.y_test), seed=seed,
  )  # fmt: skip


def _mnist_permuted(n_tasks, n_train, first_identity=False, skip=0):
  def make(data, scenario, seed):
    ds = _mnist(data)
    return streams.permuted(
      ds.x_train[skip:], ds.y_train[skip:], n_tasks=n_tasks, test=(ds.x_test, ds.y_test), seed=seed,
      first_identity=first_identity, n_train=n_train,
    )  # fmt: skip

  return make


def _mnist_permuted_task_il(n_tasks, n_train):
  """Permuted MNIST with one 10-way head per task (task-IL): task t reads columns 10t..10t+9
  (the isolation papers' protocol: WSN's ``mlp.py`` and HAT's ``pmnist`` give each task a head)."""

  def make(data, scenario, seed):
    stream = _mnist_permuted(n_tasks, n_train)(data, scenario, seed)
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


def _mnist_rotated(n_tasks, n_train):
  def make(data, scenario, seed):
    ds = _mnist(data)
    return streams.rotated(
      ds.x_train, ds.y_train, n_tasks=n_tasks, max_degrees=180.0, test=(ds.x_test, ds.y_test),
      seed=seed, n_train=n_train, interpolation="nearest",
    )  # fmt: skip

  return make


PRESETS: dict[str, Preset] = {
  "split-digits": Preset(
    "scikit-learn digits, 5 tasks x 2 classes, MLP 64-256-256, 10 epochs, batch 32 (offline)",
    _digits_split,
    (256, 256),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    32,
    epochs=10,
    scenario="task",
  ),
  "split-mnist": Preset(
    "van de Ven et al.: split MNIST 5 x 2, MLP 784-400-400, Adam 1e-3, batch 128, 2000 iters/task",
    _mnist_split,
    (400, 400),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    128,
    epochs=None,
    iters=2000,
    scenario="task",
  ),
  "split-mnist-2019": Preset(
    "split-mnist as van de Ven & Tolias' 2019 code runs it: the digits assigned to the 5 "
    "tasks at random per seed (data.py), methods at that code's per-scenario values",
    functools.partial(_mnist_split, shuffle_classes=True),
    (400, 400),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    128,
    epochs=None,
    iters=2000,
    scenario="task",
  ),
  "seq-mnist": Preset(
    "DER (Buzzega et al. 2020; mammoth seq-mnist): split MNIST 5 x 2, MLP 784-100-100, SGD, "
    "batch 10, 1 epoch, class-IL (Fashion-MNIST: --data fashion_mnist.npz)",
    _mnist_split,
    (100, 100),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
    scenario="class",
  ),
  "gdumb-mnist": Preset(
    "GDumb (Prabhu et al. 2020, drimpossible/GDumb scripts/replicate.sh): MNIST class-IL 5 x 2, "
    "MLP 784-100-100; the stream only fills the memory (--hp buffer=300/500/4400)",
    _mnist_split,
    (100, 100),
    "sgd",
    {"sgd": 0.05, "adam": 1e-3},
    16,
    epochs=1,
    scenario="class",
  ),
  "gdumb-mnist-400": Preset(
    "gdumb-mnist with the MLP 784-400-400 (GDumb's MNIST MLP-400 rows)",
    _mnist_split,
    (400, 400),
    "sgd",
    {"sgd": 0.05, "adam": 1e-3},
    16,
    epochs=1,
    scenario="class",
  ),
  "pmnist-agem": Preset(
    "A-GEM (Chaudhry et al., ICLR 2019): permuted MNIST, the 17 evaluation tasks, every training "
    "example once (MNIST train[5000:], TF's 55000 split), batch 10, MLP 784-256-256-10, SGD "
    "(VAN lr 0.03)",
    _mnist_permuted(17, None, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-agem-1k": Preset(
    "the A-GEM code's later default (commit 1ef4c10, the ER paper's protocol): as pmnist-agem "
    "but a random 1000 training examples per task",
    _mnist_permuted(17, 1000, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-5x10k": Preset(
    "a textbook permuted MNIST: 5 tasks x 10000 training examples, 1 epoch, batch 10, "
    "MLP 784-256-256-10, SGD lr 0.1 (the setting of the penalties' stability check)",
    _mnist_permuted(5, 10000),
    (256, 256),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-gem": Preset(
    "GEM (Lopez-Paz & Ranzato 2017): permuted MNIST, 20 tasks x 1000 examples, 1 epoch, batch 10, "
    "MLP 784-100-100-10, SGD lr 0.1",
    _mnist_permuted(20, 1000),
    (100, 100),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "rmnist-gem": Preset(
    "GEM: rotated MNIST, 20 tasks (angles in [9t, 9t+9) deg), 1000 examples/task, 1 epoch, "
    "batch 10, "
    "MLP 784-100-100-10, SGD lr 0.1",
    _mnist_rotated(20, 1000),
    (100, 100),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-gpm": Preset(
    "GPM (Saha et al. 2021): permuted MNIST, 10 tasks, 54000 train examples/task (10% held out), "
    "5 epochs, batch 10, MLP 784-100-100-10 without biases, SGD lr 0.01",
    _mnist_permuted(10, 54000),
    (100, 100),
    "sgd",
    {"sgd": 0.01, "adam": 1e-3},
    10,
    epochs=5,
    bias=False,
  ),
  "wsn-pmnist": Preset(
    "WSN (Kang et al. 2022, ihaeyong/WSN scripts/wsn/wsn_pmnist.sh): permuted MNIST, 10 tasks, "
    "54000 train examples/task (10% held out), a 10-way head per task (task-IL), MLP 784-100-100 "
    "without biases, Adam 1e-3, batch 10, 5 epochs",
    _mnist_permuted_task_il(10, 54000),
    (100, 100),
    "adam",
    {"sgd": 0.01, "adam": 1e-3},
    10,
    epochs=5,
    bias=False,
    scenario="task",
  ),
  "hat-pmnist": Preset(
    "HAT (Serra et al. 2018, joansj/hat run.py, pmnist): permuted MNIST, 10 tasks x 60000, a "
    "10-way head per task (task-IL), MLP 784-2000-2000, SGD 0.05, batch 64; the official up to "
    "200 epochs with early stopping capped at 5 epochs",
    _mnist_permuted_task_il(10, None),
    (2000, 2000),
    "sgd",
    {"sgd": 0.05, "adam": 1e-3},
    64,
    epochs=5,
    scenario="task",
  ),
}
