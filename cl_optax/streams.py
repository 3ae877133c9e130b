r"""Task streams for continual learning over plain numpy ``(x, y)`` arrays.

A :class:`Stream` is a sequence of :class:`Task` s plus the output layout a
model needs for its scenario (van de Ven & Tolias, 2019):

* ``"task"`` (task-incremental): the task id is known at test time. One
  output per class of the whole stream; task ``t`` reads only the columns of
  its own classes (``stream.columns[t]``), so labels are local (``0..k-1``).
  This is the "multi-head by masking logits" of GEM/A-GEM and SPG.
* ``"domain"`` (domain-incremental): one shared ``k``-way output for every
  task; labels are local (permuted / rotated MNIST, split MNIST domain-IL).
* ``"class"`` (class-incremental): one output per class; labels are global.
  While training task ``t`` only the classes seen so far are active
  (``stream.train_valid[t]``); evaluation uses every output.

Transformed tasks (``permuted``, ``rotated``) are built lazily: a task keeps a
reference to the base arrays and the indices/transform, and
:meth:`Task.train` / :meth:`Task.test` materialise them on demand, so a
20-task permuted MNIST does not hold 20 copies of the data.

Data: :func:`load_digits` (scikit-learn's bundled 8x8 digits, offline; the
default) and :func:`load_mnist` / :func:`load_fashion_mnist` from a local
``.npz`` or IDX folder. Nothing here downloads.

Example:
  >>> import numpy as np
  >>> from cl_optax import streams
  >>> x = np.random.default_rng(0).random((40, 4), dtype=np.float32)
  >>> y = np.repeat(np.arange(4), 10)
  >>> s = streams.split(x, y, classes_per_task=2, scenario="task", seed=0)
  >>> len(s), s.n_outputs, s.columns.tolist()
  (2, 4, [[0, 1], [2, 3]])
  >>> xtr, ytr = s[1].train()
  >>> sorted(set(ytr.tolist()))  # local labels 0..k-1
  [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cl_optax._datasets import ENV_VAR as ENV_VAR
from cl_optax._datasets import Dataset as Dataset
from cl_optax._datasets import load_digits as load_digits
from cl_optax._datasets import load_fashion_mnist as load_fashion_mnist
from cl_optax._datasets import load_mnist as load_mnist
from cl_optax._datasets import read_idx as read_idx
from cl_optax._image_maps import permute, rotate
from cl_optax._image_maps import rotation_weights as rotation_weights
from cl_optax._stream_types import Stream as Stream
from cl_optax._stream_types import Task as Task

SCENARIOS = ("task", "domain", "class")


def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
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


def _check_scenario(scenario: str, what: str) -> None:
  if scenario not in SCENARIOS:
    raise ValueError(f"{what}: scenario must be one of {SCENARIOS}; got {scenario!r}.")


def _check_n_tasks(n_tasks, what: str) -> None:
  if not isinstance(n_tasks, int | np.integer) or n_tasks < 1:
    raise ValueError(f"{what}: n_tasks must be a positive int; got {n_tasks!r}.")


def _subsample(rng, n: int, k: int | None, what: str) -> np.ndarray | None:
  if k is None:
    return None
  if not 0 < k <= n:
    raise ValueError(f"{what}: n_train must be in [1, {n}]; got {k}.")
  return np.sort(rng.choice(n, size=k, replace=False))


# ----------------------------------------------------------------- streams


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
  xt, yt = _check_xy(*test, f"{what} (test)")
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
  x,
  y,
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
  x, y = _check_xy(x, y, what)
  _check_scenario(scenario, what)
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


def _domain_stream(name, x, y, xt, yt, transforms, names, n_train, seed, what) -> Stream:
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
      train_index=_subsample(rng, len(x), n_train, what),
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
  x,
  y,
  *,
  n_tasks: int,
  test: tuple | None = None,
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
  x, y = _check_xy(x, y, what)
  _check_n_tasks(n_tasks, what)
  xt, yt = (x, y) if test is None else _check_xy(*test, f"{what} (test)")
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
  x,
  y,
  *,
  n_tasks: int | None = None,
  angles: Sequence[float] | None = None,
  max_degrees: float = 180.0,
  test: tuple | None = None,
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
  x, y = _check_xy(x, y, what)
  xt, yt = (x, y) if test is None else _check_xy(*test, f"{what} (test)")
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
    _check_n_tasks(n_tasks, what)
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


# -------------------------------------------------------------------- data


def minibatches(x, y, batch_size: int, rng: np.random.Generator):
  """Yields shuffled ``(x, y)`` minibatches: one pass, the last partial batch dropped.

  Args:
    x, y: arrays with the same first axis.
    batch_size: examples per batch (a positive int, at most ``len(x)``).
    rng: a ``numpy.random.Generator``; the order depends only on its state.

  Example:
    >>> import numpy as np
    >>> from cl_optax import streams
    >>> x, y = np.arange(10.0)[:, None], np.arange(10)
    >>> [len(b) for b, _ in streams.minibatches(x, y, 4, np.random.default_rng(0))]
    [4, 4]
  """
  x, y = _check_xy(x, y, "minibatches")
  if not (isinstance(batch_size, int | np.integer) and 0 < batch_size <= len(x)):
    raise ValueError(
      f"minibatches: batch_size must be an int in [1, {len(x)}] (the examples); got {batch_size!r}."
    )
  order = rng.permutation(len(x))
  for i in range(0, len(x) - batch_size + 1, batch_size):
    j = order[i : i + batch_size]
    yield x[j], y[j]
