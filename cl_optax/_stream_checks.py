"""Checks of the arrays and options the stream builders take (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

SCENARIOS = ("task", "domain", "class")


def check_xy(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` as arrays: ``x`` ``[n, ...]``, ``y`` ``[n]`` non-negative integer labels."""
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim < 2:
    raise ValueError(f"{what}: x must have shape [n, ...features]; got shape {x.shape}.")
  if y.ndim != 1 or len(y) != len(x):
    raise ValueError(
      f"{what}: y must have shape [n] with n = len(x) = {len(x)}; got shape {y.shape}."
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what}: y must hold integer class labels; got dtype {y.dtype}.")
  if len(y) and y.min() < 0:
    raise ValueError(f"{what}: class labels must be >= 0; got min {y.min()}.")
  return x, y


def check_scenario(scenario: str, what: str) -> None:
  """Raises a ``ValueError`` unless ``scenario`` is one of :data:`SCENARIOS`."""
  if scenario not in SCENARIOS:
    raise ValueError(f"{what}: scenario must be one of {SCENARIOS}; got {scenario!r}.")


def check_n_tasks(n_tasks: Any, what: str) -> int:
  """``n_tasks`` as an int; raises a ``ValueError`` unless it is a positive int."""
  if not isinstance(n_tasks, int | np.integer) or n_tasks < 1:
    raise ValueError(f"{what}: n_tasks must be a positive int; got {n_tasks!r}.")
  return int(n_tasks)


def subsample(rng: np.random.Generator, n: int, k: int | None, what: str) -> np.ndarray | None:
  """Sorted indices of a random ``k``-subset of ``range(n)`` (``None`` when ``k`` is)."""
  if k is None:
    return None
  if not 0 < k <= n:
    raise ValueError(f"{what}: n_train must be in [1, {n}]; got {k}.")
  return np.sort(rng.choice(n, size=k, replace=False))
