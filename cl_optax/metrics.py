r"""Continual-learning metrics over an accuracy matrix.

``R[i, j]`` is the test accuracy on task ``j`` after training tasks
``0..i`` (``T x T``, rows in training order). With ``T`` tasks:

.. math::
  \mathrm{ACC} = \frac1T \sum_{j} R_{T-1, j}, \qquad
  \mathrm{BWT} = \frac1{T-1} \sum_{j<T-1} R_{T-1, j} - R_{j, j}, \\
  \mathrm{FWT} = \frac1{T-1} \sum_{j>0} R_{j-1, j} - b_j, \qquad
  F = \frac1{T-1} \sum_{j<T-1} \max_{l<T-1} R_{l, j} - R_{T-1, j},

where ``b_j`` is the accuracy on task ``j`` of the model at its random
initialisation. ACC, BWT and FWT are Lopez-Paz & Ranzato (GEM, NeurIPS 2017,
Sec. 2); ``F`` is the average forgetting of Chaudhry et al. (RWalk, ECCV 2018,
Eq. 6-7; used by A-GEM, ICLR 2019). The official GEM code
(``metrics/metrics.py``) divides BWT and FWT by ``T`` (its entries for the
last / first task are 0); these functions follow the papers' ``T - 1``.

The loss-of-plasticity streams (:func:`cl_optax.streams.online_permuted`)
have no test set and no accuracy matrix: :func:`online_accuracy`,
:func:`dead_fraction`, :func:`effective_rank` and
:func:`mean_weight_magnitude` measure them (jittable).

Example:
  >>> import numpy as np
  >>> from cl_optax import metrics
  >>> R = np.array([[0.9, 0.1], [0.6, 0.8]])
  >>> float(metrics.average_accuracy(R)), round(float(metrics.backward_transfer(R)), 6)
  (0.7, -0.3)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cl_optax._plasticity_metrics import dead_fraction as dead_fraction
from cl_optax._plasticity_metrics import effective_rank as effective_rank
from cl_optax._plasticity_metrics import mean_weight_magnitude as mean_weight_magnitude
from cl_optax._plasticity_metrics import online_accuracy as online_accuracy

__all__ = [
  "average_accuracy",
  "average_accuracy_curve",
  "backward_transfer",
  "dead_fraction",
  "effective_rank",
  "forgetting",
  "forward_transfer",
  "mean_weight_magnitude",
  "online_accuracy",
  "summary",
]


def _check(R: ArrayLike, what: str, min_tasks: int = 1) -> np.ndarray:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1]:
    raise ValueError(
      f"{what}: the accuracy matrix must be square [T, T] (R[i, j] = accuracy on task j "
      f"after training task i); got shape {R.shape}."
    )
  if R.shape[0] < min_tasks:
    raise ValueError(f"{what}: needs at least {min_tasks} tasks; got {R.shape[0]}.")
  if not np.all(np.isfinite(R)):
    raise ValueError(f"{what}: the accuracy matrix holds non-finite values.")
  return R


def average_accuracy(R: ArrayLike) -> float:
  """Mean accuracy over all tasks after training the last one."""
  R = _check(R, "average_accuracy")
  return float(R[-1].mean())


def average_accuracy_curve(R: ArrayLike) -> np.ndarray:
  """``[T]``: mean accuracy over the tasks seen so far, after each task."""
  R = _check(R, "average_accuracy_curve")
  return np.array([R[i, : i + 1].mean() for i in range(len(R))])


def backward_transfer(R: ArrayLike) -> float:
  """Mean change on old tasks from when they were learnt to the end (< 0: forgetting)."""
  R = _check(R, "backward_transfer", 2)
  T = len(R)
  return float(np.mean(R[-1, : T - 1] - np.diag(R)[: T - 1]))


def forward_transfer(R: ArrayLike, baseline: ArrayLike) -> float:
  """Mean accuracy on a task before training it, minus the random-init accuracy.

  Meaningful where a model can answer a task before training on it: task- and
  domain-incremental streams (a task's head or the shared labels exist from the
  start). In class-incremental learning a task's classes are never predicted
  before they are trained (their output units are inactive or never the
  argmax), so ``R[j-1, j] = 0`` for every method and FWT is only ``-mean(b_j)``:
  report it as undefined there (the benchmark runner records ``None``).

  Args:
    R: the ``[T, T]`` accuracy matrix.
    baseline: ``[T]`` accuracies of the randomly initialised model.
  """
  R = _check(R, "forward_transfer", 2)
  b = np.asarray(baseline, dtype=np.float64)
  if b.shape != (len(R),):
    raise ValueError(
      f"forward_transfer: baseline must have shape ({len(R)},) (random-init accuracy per "
      f"task); got {b.shape}."
    )
  if not np.all(np.isfinite(b)):
    raise ValueError("forward_transfer: baseline holds non-finite values.")
  return float(np.mean([R[j - 1, j] - b[j] for j in range(1, len(R))]))


def forgetting(R: ArrayLike) -> float:
  """Average forgetting (Chaudhry et al. 2018): best earlier accuracy minus final."""
  R = _check(R, "forgetting", 2)
  T = len(R)
  return float(np.mean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


def summary(R: ArrayLike, baseline: ArrayLike | None = None) -> dict[str, Any]:
  """All metrics: floats, and the list ``acc_curve`` (BWT, forgetting, FWT when defined)."""
  R = _check(R, "summary")
  out = {"acc": average_accuracy(R), "acc_curve": average_accuracy_curve(R).tolist()}
  if len(R) > 1:
    out["bwt"] = backward_transfer(R)
    out["forgetting"] = forgetting(R)
    if baseline is not None:
      out["fwt"] = forward_transfer(R, baseline)
  return out
