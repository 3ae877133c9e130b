"""Class-split task streams: :func:`split`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cl_optax._stream_checks import check_scenario, check_xy
from cl_optax._stream_types import Stream, Task


def _class_groups(
  classes: np.ndarray,
  classes_per_task: int | None,
  groups: Sequence[Sequence[int]] | None,
  scenario: str,
  what: str,
) -> list[tuple[int, ...]]:
  """The tasks' class groups: ``groups`` checked, or runs of ``classes_per_task`` sorted classes."""
  if groups is None:
    if not isinstance(classes_per_task, int) or classes_per_task < 1:
      raise ValueError(
        f"{what}: classes_per_task must be a positive int; got {classes_per_task!r}."
      )
    if len(classes) % classes_per_task:
      raise ValueError(
        f"{what}: {len(classes)} classes cannot be split into groups of {classes_per_task}; "
        "pass groups= explicitly."
      )
    groups = [
      tuple(classes[i : i + classes_per_task]) for i in range(0, len(classes), classes_per_task)
    ]
  groups = [tuple(int(c) for c in g) for g in groups]
  sizes = {len(g) for g in groups}
  if not groups or 0 in sizes:
    raise ValueError(f"{what}: groups must be non-empty; got {groups}.")
  flat = [c for g in groups for c in g]
  if len(set(flat)) != len(flat):
    raise ValueError(f"{what}: class groups must be disjoint; got {groups}.")
  missing = sorted(set(flat) - set(classes.tolist()))
  if missing:
    raise ValueError(f"{what}: classes {missing} of groups {groups} do not occur in y.")
  if scenario != "task" and len(sizes) != 1:
    raise ValueError(f"{what}: {scenario}-incremental needs groups of equal size; got {groups}.")
  return groups


def _test_data(
  x: np.ndarray,
  y: np.ndarray,
  test: tuple[Any, Any] | None,
  test_fraction: float,
  what: str,
) -> tuple[np.ndarray, np.ndarray]:
  """The arrays the test indices point into: ``test`` checked, or ``(x, y)`` themselves."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"{what}: test_fraction must be in (0, 1); got {test_fraction}.")
  if test is None:
    return x, y
  xt, yt = check_xy(*test, f"{what} (test)")
  if xt.shape[1:] != x.shape[1:]:
    raise ValueError(f"{what}: test inputs have shape {xt.shape[1:]}; expected {x.shape[1:]}.")
  return xt, yt


def _group_indices(
  y: np.ndarray,
  yt: np.ndarray,
  g: tuple[int, ...],
  held_out: bool,
  test_fraction: float,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Train and test indices of group ``g``: a shuffled split of ``y`` when ``held_out``."""
  idx = np.flatnonzero(np.isin(y, g))
  if held_out:
    idx = rng.permutation(idx)
    cut = int((1.0 - test_fraction) * len(idx))
    return idx[:cut], idx[cut:]
  return idx, np.flatnonzero(np.isin(yt, g))


def _group_labels(g: tuple[int, ...], scenario: str, size: int) -> np.ndarray:
  """Label map ``[size]``: global labels (class-IL) or local ``0..k-1``; -1 off the group."""
  labels = np.full(size, -1, np.int64)
  if scenario == "class":
    labels[list(g)] = list(g)
  else:
    labels[list(g)] = np.arange(len(g))
  return labels


def _group_outputs(
  g: tuple[int, ...], scenario: str, k: int, n_classes: int, seen: list[int]
) -> tuple[np.ndarray, np.ndarray]:
  """The output columns a task reads and which of them train (``seen``: classes so far)."""
  if scenario == "task":
    cols = np.asarray(list(g) + [g[-1]] * (k - len(g)))
    return cols, np.arange(k) < len(g)
  if scenario == "domain":
    return np.arange(k), np.ones(k, bool)
  return np.arange(n_classes), np.isin(np.arange(n_classes), seen)


def split(
  x: ArrayLike,
  y: ArrayLike,
  *,
  classes_per_task: int | None = 2,
  groups: Sequence[Sequence[int]] | None = None,
  scenario: str = "task",
  test: tuple[Any, Any] | None = None,
  test_fraction: float = 0.2,
  seed: int = 0,
) -> Stream:
  """Splits a classification dataset into tasks of disjoint class groups.

  Args:
    x, y: inputs ``[n, ...]`` and integer labels ``[n]``.
    classes_per_task: consecutive sorted classes per task (ignored when
      ``groups`` is given); the class count must be a multiple of it.
    groups: explicit class groups, one per task, pairwise disjoint.
    scenario: ``"task"``, ``"domain"`` or ``"class"`` (see the module doc).
    test: optional ``(x_test, y_test)``; without it each task's examples are
      shuffled with ``seed`` and the last ``test_fraction`` held out.
    test_fraction: held-out fraction per task when ``test`` is ``None``.
    seed: seed of the shuffle for the held-out split.

  Returns:
    A :class:`Stream`.
  """
  what = "split"
  x, y = check_xy(x, y, what)
  check_scenario(scenario, what)
  groups = _class_groups(np.unique(y), classes_per_task, groups, scenario, what)
  xt, yt = _test_data(x, y, test, test_fraction, what)

  n_classes = int(max(c for g in groups for c in g)) + 1
  k = max(len(g) for g in groups)
  rng = np.random.default_rng(seed)
  tasks, columns, valid = [], [], []
  seen: list[int] = []
  for g in groups:
    tr, te = _group_indices(y, yt, g, test is None, test_fraction, rng)
    labels = _group_labels(g, scenario, max(int(y.max()), int(yt.max()), n_classes - 1) + 1)
    tasks.append(
      Task(
        name=f"classes {g}",
        classes=np.asarray(g),
        x_train=x,
        y_train=y,
        x_test=xt,
        y_test=yt,
        train_index=tr,
        test_index=te,
        labels=labels,
      )
    )
    seen += list(g)
    cols, ok = _group_outputs(g, scenario, k, n_classes, seen)
    columns.append(cols)
    valid.append(ok)
  n_out = {"task": n_classes, "domain": k, "class": n_classes}[scenario]
  return Stream(
    name=f"split ({len(groups)} tasks, {scenario}-incremental)",
    scenario=scenario,
    tasks=tuple(tasks),
    n_outputs=n_out,
    columns=np.asarray(columns, np.int32),
    train_valid=np.asarray(valid, bool),
  )
