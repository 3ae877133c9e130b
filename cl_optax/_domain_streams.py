"""Domain-incremental task streams: :func:`permuted` and :func:`rotated` inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cl_optax._image_maps import permute, rotate
from cl_optax._stream_checks import check_n_tasks, check_xy, subsample
from cl_optax._stream_types import Stream, Task


def _domain_stream(name, x, y, xt, yt, transforms, names, n_train, seed, what) -> Stream:
  """A domain-incremental stream: one task per input transform, all classes shared."""
  n_classes = int(max(y.max(), yt.max())) + 1
  rng = np.random.default_rng(seed + 1)
  tasks = [
    Task(
      name=nm,
      classes=np.arange(n_classes),
      x_train=x,
      y_train=y,
      x_test=xt,
      y_test=yt,
      train_index=subsample(rng, len(x), n_train, what),
      transform=tf,
    )
    for tf, nm in zip(transforms, names)
  ]
  n = len(tasks)
  return Stream(
    name=name,
    scenario="domain",
    tasks=tuple(tasks),
    n_outputs=n_classes,
    columns=np.tile(np.arange(n_classes, dtype=np.int32), (n, 1)),
    train_valid=np.ones((n, n_classes), bool),
  )


def permuted(
  x: ArrayLike,
  y: ArrayLike,
  *,
  n_tasks: int,
  test: tuple[Any, Any] | None = None,
  seed: int = 0,
  first_identity: bool = False,
  n_train: int | None = None,
) -> Stream:
  """Permuted inputs (Goodfellow et al. 2013; Kirkpatrick et al. 2017).

  Every task applies one fixed permutation of the flattened input features,
  drawn from ``seed``; labels are shared (domain-incremental). Inputs come out
  flattened to ``[n, features]``.

  Args:
    x, y: inputs ``[n, ...]`` and integer labels.
    n_tasks: number of tasks.
    test: ``(x_test, y_test)`` permuted like the training data; ``None``
      evaluates on the training arrays (only for quick checks).
    seed: seed of the permutations (and of the ``n_train`` subsets).
    first_identity: task 0 keeps the original feature order.
    n_train: optional number of training examples per task, a random subset
      drawn per task (GEM and A-GEM use 1000).

  Returns:
    A domain-incremental :class:`Stream`; ``stream[t].transform`` holds the
    permutation.
  """
  what = "permuted"
  x, y = check_xy(x, y, what)
  n_tasks = check_n_tasks(n_tasks, what)
  xt, yt = (x, y) if test is None else check_xy(*test, f"{what} (test)")
  d = int(np.prod(x.shape[1:]))
  if int(np.prod(xt.shape[1:])) != d:
    raise ValueError(
      f"{what}: test inputs have {int(np.prod(xt.shape[1:]))} features; expected {d}."
    )
  rng = np.random.default_rng(seed)
  perms = [rng.permutation(d) for _ in range(n_tasks)]
  if first_identity:
    perms[0] = np.arange(d)
  return _domain_stream(
    f"permuted ({n_tasks} tasks)",
    x,
    y,
    xt,
    yt,
    [permute(p) for p in perms],
    [f"permutation {t}" for t in range(n_tasks)],
    n_train,
    seed,
    what,
  )


def rotated(
  x: ArrayLike,
  y: ArrayLike,
  *,
  n_tasks: int | None = None,
  angles: Sequence[float] | None = None,
  max_degrees: float = 180.0,
  test: tuple[Any, Any] | None = None,
  image_shape: tuple[int, int] | None = None,
  interpolation: str = "nearest",
  seed: int = 0,
  n_train: int | None = None,
) -> Stream:
  """Rotated images, one fixed angle per task (domain-incremental).

  Without ``angles``, task ``t`` of ``n_tasks`` gets an angle drawn uniformly
  from ``[t, t + 1) * max_degrees / n_tasks`` with ``seed``, as GEM's
  ``mnist_rotations.py`` (0 to 180 degrees over 20 tasks).

  Args:
    x, y: images ``[n, h, w]`` (or ``[n, h*w]`` with ``image_shape``), labels.
    n_tasks: number of tasks when ``angles`` is not given.
    angles: explicit angles in degrees, counter-clockwise.
    max_degrees: the range the drawn angles span.
    test: ``(x_test, y_test)``, rotated like the training data.
    image_shape: ``(h, w)`` for flattened inputs.
    interpolation: ``"nearest"`` (PIL's default) or ``"bilinear"``.
    seed: seed of the angles and of the ``n_train`` subsets.
    n_train: optional random subset size per task.

  Returns:
    A domain-incremental :class:`Stream`; task names give the angles.
  """
  what = "rotated"
  x, y = check_xy(x, y, what)
  xt, yt = (x, y) if test is None else check_xy(*test, f"{what} (test)")
  if image_shape is None:
    if x.ndim != 3:
      raise ValueError(
        f"{what}: x must have shape [n, h, w], or pass image_shape=(h, w); got {x.shape}."
      )
    image_shape = x.shape[1:]
  h, w = image_shape
  for arr, nm in ((x, "x"), (xt, "x_test")):
    if int(np.prod(arr.shape[1:])) != h * w:
      raise ValueError(f"{what}: {nm} has shape {arr.shape}; expected {h * w} pixels per image.")
  if angles is None:
    n_tasks = check_n_tasks(n_tasks, what)
    rng = np.random.default_rng(seed)
    step = max_degrees / n_tasks
    angles = [step * (t + rng.random()) for t in range(n_tasks)]
  elif n_tasks is not None and n_tasks != len(angles):
    raise ValueError(f"{what}: n_tasks={n_tasks} but {len(angles)} angles given.")
  angles = [float(a) for a in angles]
  return _domain_stream(
    f"rotated ({len(angles)} tasks)",
    x,
    y,
    xt,
    yt,
    [rotate((h, w), a, interpolation) for a in angles],
    [f"rotation {a:.1f} deg" for a in angles],
    n_train,
    seed,
    what,
  )
