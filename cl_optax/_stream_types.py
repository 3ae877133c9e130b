"""The task and stream containers of :mod:`cl_optax.streams`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One task: a view of base arrays (indices + an optional transform).

  Attributes:
    name: a readable description (``"classes (0, 1)"``, ``"permutation 3"``).
    classes: the global class ids present in this task.
    x_train, y_train, x_test, y_test: the base arrays (shared, never copied).
    train_index, test_index: rows of the base arrays (``None``: all rows).
    labels: maps base labels to this task's targets (``None``: identity).
    transform: maps a batch of base inputs to this task's inputs.
  """

  name: str
  classes: np.ndarray
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  train_index: np.ndarray | None = None
  test_index: np.ndarray | None = None
  labels: np.ndarray | None = None
  transform: Callable[[np.ndarray], np.ndarray] | None = None

  def _view(self, x, y, index):
    if index is not None:
      x, y = x[index], y[index]
    if self.transform is not None:
      x = self.transform(x)
    y = y if self.labels is None else self.labels[y]
    return x, np.asarray(y, np.int32)

  def train(self) -> tuple[np.ndarray, np.ndarray]:
    """The task's training inputs and targets (materialised now)."""
    return self._view(self.x_train, self.y_train, self.train_index)

  def test(self) -> tuple[np.ndarray, np.ndarray]:
    """The task's test inputs and targets (materialised now)."""
    return self._view(self.x_test, self.y_test, self.test_index)

  @property
  def n_train(self) -> int:
    return len(self.y_train) if self.train_index is None else len(self.train_index)

  @property
  def n_test(self) -> int:
    return len(self.y_test) if self.test_index is None else len(self.test_index)


@dataclasses.dataclass(frozen=True, eq=False)
class Stream(Sequence):
  """A sequence of tasks and the output layout of its scenario.

  Attributes:
    name: a readable description.
    scenario: ``"task"``, ``"domain"`` or ``"class"``.
    tasks: the tasks in training order.
    n_outputs: width of the model's output layer.
    columns: ``int32 [n_tasks, k]``: the output columns task ``t`` reads; the
      target of an example is an index into its row.
    train_valid: ``bool [n_tasks, k]``: the columns active while training
      task ``t`` (all ``True`` except in class-incremental streams, where
      only the classes seen so far are active).
  """

  name: str
  scenario: str
  tasks: tuple[Task, ...]
  n_outputs: int
  columns: np.ndarray
  train_valid: np.ndarray

  def __len__(self) -> int:
    return len(self.tasks)

  @property
  def eval_valid(self) -> np.ndarray:
    """``bool [n_tasks, k]``: the columns read when evaluating task ``j``
    (every output in class-incremental streams, else ``train_valid``)."""
    if self.scenario == "class":
      return np.ones_like(self.train_valid)
    return self.train_valid

  def __getitem__(self, i):
    return self.tasks[i]


# ------------------------------------------------------------------ checks
