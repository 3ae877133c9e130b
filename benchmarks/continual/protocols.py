"""Protocols: the presets (data, stream, model, optimiser).

A new preset is one `PRESETS` entry plus, where a paper tuned a method for it, rows
of `paper_settings.SETTINGS`; no method entry changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from benchmarks.continual.mnist_streams import (
  digits_split,
  mnist_permuted,
  mnist_permuted_task_il,
  mnist_rotated,
  mnist_rotated_uniform,
  mnist_split,
)
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


PRESETS: dict[str, Preset] = {
  "split-digits": Preset(
    "scikit-learn digits, 5 tasks x 2 classes, MLP 64-256-256, 10 epochs, batch 32 (offline)",
    digits_split,
    (256, 256),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    32,
    epochs=10,
    scenario="task",
  ),
  "split-mnist": Preset(
    "van de Ven et al.: split MNIST 5 x 2, MLP 784-400-400, Adam 1e-3, batch 128, 2000 iters/task",
    mnist_split,
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
    functools.partial(mnist_split, shuffle_classes=True),
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
    mnist_split,
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
    mnist_split,
    (100, 100),
    "sgd",
    {"sgd": 0.05, "adam": 1e-3},
    16,
    epochs=1,
    scenario="class",
  ),
  "gdumb-mnist-400": Preset(
    "gdumb-mnist with the MLP 784-400-400 (GDumb's MNIST MLP-400 rows)",
    mnist_split,
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
    mnist_permuted(17, None, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-agem-1k": Preset(
    "the A-GEM code's later default (commit 1ef4c10, the ER paper's protocol): as pmnist-agem "
    "but a random 1000 training examples per task",
    mnist_permuted(17, 1000, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-5x10k": Preset(
    "a textbook permuted MNIST: 5 tasks x 10000 training examples, 1 epoch, batch 10, "
    "MLP 784-256-256-10, SGD lr 0.1 (the setting of the penalties' stability check)",
    mnist_permuted(5, 10000),
    (256, 256),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-gem": Preset(
    "GEM (Lopez-Paz & Ranzato 2017): permuted MNIST, 20 tasks x 1000 examples, 1 epoch, batch 10, "
    "MLP 784-100-100-10, SGD lr 0.1",
    mnist_permuted(20, 1000),
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
    mnist_rotated(20, 1000),
    (100, 100),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "der-pmnist": Preset(
    "DER (Buzzega et al. 2020; mammoth perm-mnist): permuted MNIST, domain-IL, 20 tasks (every "
    "task permuted), all 60 000 training examples per task, 1 epoch, batch 128, MLP "
    "784-100-100-10, SGD (lr 0.2)",
    mnist_permuted(20, None),
    (100, 100),
    "sgd",
    {"sgd": 0.2, "adam": 1e-3},
    128,
    epochs=1,
  ),
  "der-rmnist": Preset(
    "DER (mammoth rot-mnist): rotated MNIST, domain-IL, 20 tasks, one angle per task from "
    "U(0, 180) degrees, all 60 000 training examples per task, 1 epoch, batch 128, MLP "
    "784-100-100-10, SGD (lr 0.2)",
    mnist_rotated_uniform(20),
    (100, 100),
    "sgd",
    {"sgd": 0.2, "adam": 1e-3},
    128,
    epochs=1,
  ),
  "pmnist-gpm": Preset(
    "GPM (Saha et al. 2021): permuted MNIST, 10 tasks, 54000 train examples/task (10% held out), "
    "5 epochs, batch 10, MLP 784-100-100-10 without biases, SGD lr 0.01",
    mnist_permuted(10, 54000),
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
    mnist_permuted_task_il(10, 54000),
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
    mnist_permuted_task_il(10, None),
    (2000, 2000),
    "sgd",
    {"sgd": 0.05, "adam": 1e-3},
    64,
    epochs=5,
    scenario="task",
  ),
}
