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

import dataclasses
import gzip
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

SCENARIOS = ("task", "domain", "class")
ENV_VAR = "CL_OPTAX_DATA"


class Dataset(NamedTuple):
  """Train and test arrays. ``x_test``/``y_test`` are ``None`` when the
  source has no official test split (scikit-learn's digits)."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray | None
  y_test: np.ndarray | None


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


def split(
  x,
  y,
  *,
  classes_per_task: int | None = 2,
  groups: Sequence[Sequence[int]] | None = None,
  scenario: str = "task",
  test: tuple | None = None,
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
  classes = np.unique(y)
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
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"{what}: test_fraction must be in (0, 1); got {test_fraction}.")
  if test is not None:
    xt, yt = _check_xy(*test, f"{what} (test)")
    if xt.shape[1:] != x.shape[1:]:
      raise ValueError(f"{what}: test inputs have shape {xt.shape[1:]}; expected {x.shape[1:]}.")
  else:
    xt, yt = x, y

  n_classes = int(max(flat)) + 1
  k = max(sizes)
  rng = np.random.default_rng(seed)
  tasks, columns, valid = [], [], []
  seen: list[int] = []
  for t, g in enumerate(groups):
    labels = np.full(max(int(y.max()), int(yt.max()), n_classes - 1) + 1, -1, np.int64)
    if scenario == "class":
      labels[list(g)] = list(g)
    else:
      labels[list(g)] = np.arange(len(g))
    idx = np.flatnonzero(np.isin(y, g))
    if test is None:
      idx = rng.permutation(idx)
      cut = int((1.0 - test_fraction) * len(idx))
      tr, te = idx[:cut], idx[cut:]
    else:
      tr, te = idx, np.flatnonzero(np.isin(yt, g))
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
    if scenario == "task":
      cols = np.asarray(list(g) + [g[-1]] * (k - len(g)))
      columns.append(cols)
      valid.append(np.arange(k) < len(g))
    elif scenario == "domain":
      columns.append(np.arange(k))
      valid.append(np.ones(k, bool))
    else:
      columns.append(np.arange(n_classes))
      valid.append(np.isin(np.arange(n_classes), seen))
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


def _permute(perm):
  return lambda x: x.reshape(len(x), -1)[:, perm]


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
    [_permute(p) for p in perms],
    [f"permutation {t}" for t in range(n_tasks)],
    n_train,
    seed,
    what,
  )


def rotation_weights(shape: tuple[int, int], degrees: float, *, interpolation: str = "nearest"):
  """Source pixels and weights of a counter-clockwise rotation about the centre.

  Returns ``(index [4, h*w], weight [4, h*w])`` into the flattened image;
  pixels that fall outside the source image get weight 0 (black fill), as
  PIL's ``Image.rotate`` does. ``interpolation="nearest"`` is PIL's default
  (what GEM's ``mnist_rotations.py`` used); ``"bilinear"`` is smoother.
  """
  if interpolation not in ("nearest", "bilinear"):
    raise ValueError(
      f"rotation: interpolation must be 'nearest' or 'bilinear'; got {interpolation!r}."
    )
  h, w = shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  theta = np.deg2rad(degrees)
  # Output pixel (r, c) in centred coordinates with y up; rotate back by -theta.
  xo, yo = c - cx, cy - r
  xs = np.cos(theta) * xo + np.sin(theta) * yo
  ys = -np.sin(theta) * xo + np.cos(theta) * yo
  src_c, src_r = (xs + cx).ravel(), (cy - ys).ravel()
  if interpolation == "nearest":
    rr, cc = np.rint(src_r).astype(int), np.rint(src_c).astype(int)
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    index = np.where(inside, rr * w + cc, 0)[None]
    return index, inside.astype(np.float32)[None]
  r0, c0 = np.floor(src_r).astype(int), np.floor(src_c).astype(int)
  fr, fc = src_r - r0, src_c - c0
  idx, wts = [], []
  for dr, dc, wt in (
    (0, 0, (1 - fr) * (1 - fc)),
    (0, 1, (1 - fr) * fc),
    (1, 0, fr * (1 - fc)),
    (1, 1, fr * fc),
  ):
    rr, cc = r0 + dr, c0 + dc
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    idx.append(np.where(inside, rr * w + cc, 0))
    wts.append(np.where(inside, wt, 0.0))
  return np.stack(idx), np.stack(wts).astype(np.float32)


def _rotate(shape, degrees, interpolation):
  index, weight = rotation_weights(shape, degrees, interpolation=interpolation)

  def apply(x):
    flat = x.reshape(len(x), -1).astype(np.float32, copy=False)
    out = np.zeros_like(flat)
    for i, wt in zip(index, weight):
      out += flat[:, i] * wt
    return out.reshape(x.shape)

  return apply


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
    [_rotate((h, w), a, interpolation) for a in angles],
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


def load_digits() -> Dataset:
  """scikit-learn's bundled 8x8 digits (1797 images, offline), in [0, 1].

  Returns ``Dataset(x [1797, 64] float32, y int32, None, None)``: there is no
  official test split, so :func:`split` holds out a fraction per task.
  scikit-learn is imported here, not by ``cl_optax``: it is in the ``test``
  and ``bench`` extras (``pip install 'cl-optax[bench]'``).
  """
  try:
    from sklearn.datasets import load_digits as _load
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "cl_optax.streams.load_digits needs scikit-learn (its bundled digits are the "
      "offline default data set): pip install scikit-learn, or the extras "
      "`pip install 'cl-optax[bench]'`."
    ) from e
  x, y = _load(return_X_y=True)
  return Dataset((x / 16.0).astype(np.float32), y.astype(np.int32), None, None)


_IDX = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
_SOURCES = {
  "mnist": "http://yann.lecun.com/exdb/mnist/ (or any mirror of the four IDX files)",
  "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
}


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): ``uint8`` images or labels."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"read_idx: {path} is not an unsigned-byte IDX file (bad magic number).")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(dims)):
    raise ValueError(f"read_idx: {path} holds {payload.size} values; its header says {dims}.")
  return payload.reshape(dims)


def _find_idx(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (
    stem,
    stem + ".gz",
    stem.replace("-idx", ".idx"),
    stem.replace("-idx", ".idx") + ".gz",
  ):
    if (folder / name).is_file():
      return folder / name
  return None


def _candidates(name: str, path) -> list[pathlib.Path]:
  if path is not None:
    roots = [pathlib.Path(path).expanduser()]
  elif os.environ.get(ENV_VAR):
    roots = [pathlib.Path(os.environ[ENV_VAR]).expanduser()]
  else:
    roots = [pathlib.Path("data")]
  out = []
  for root in roots:
    if root.suffix == ".npz":
      out.append(root)
    else:
      out += [root / f"{name}.npz", root, root / name]
  return out


def _load_arrays(name: str, path) -> Dataset:
  looked = []
  for cand in _candidates(name, path):
    looked.append(str(cand))
    if cand.suffix == ".npz" and cand.is_file():
      with np.load(cand) as z:
        missing = [k for k in _IDX if k not in z.files]
        if missing:
          raise ValueError(f"load_{name}: {cand} lacks the arrays {missing}; it has {z.files}.")
        return Dataset(*(np.asarray(z[k]) for k in _IDX))
    if cand.is_dir():
      found = {k: _find_idx(cand, stem) for k, stem in _IDX.items()}
      if all(found.values()):
        return Dataset(*(read_idx(found[k]) for k in _IDX))
  raise FileNotFoundError(
    f"load_{name}: no {name} data found. Looked for `{name}.npz` (arrays x_train, y_train, "
    f"x_test, y_test) or the four IDX files ({', '.join(_IDX.values())}, optionally .gz) in: "
    f"{', '.join(looked)}. Pass path= (a .npz file or a folder) or set {ENV_VAR}. "
    f"Get the files from {_SOURCES[name]}; nothing is downloaded automatically."
  )


def _normalise(ds: Dataset) -> Dataset:
  x_train = (ds.x_train.astype(np.float32) / 255.0).reshape(len(ds.x_train), 28, 28)
  x_test = (ds.x_test.astype(np.float32) / 255.0).reshape(len(ds.x_test), 28, 28)
  return Dataset(x_train, ds.y_train.astype(np.int32), x_test, ds.y_test.astype(np.int32))


def load_mnist(path: str | os.PathLike | None = None) -> Dataset:
  """MNIST from a local ``.npz`` or IDX folder, as float32 in [0, 1].

  Args:
    path: a ``.npz`` file (keys ``x_train, y_train, x_test, y_test``) or a
      folder holding ``mnist.npz`` or the four IDX files (``.gz`` or not).
      Default: ``$CL_OPTAX_DATA``, else ``./data``.

  Returns:
    ``Dataset`` with images ``[n, 28, 28]`` float32 and int32 labels.

  Raises:
    FileNotFoundError: naming every place it looked and where to get the data.
  """
  return _normalise(_load_arrays("mnist", path))


def load_fashion_mnist(path: str | os.PathLike | None = None) -> Dataset:
  """Fashion-MNIST, like :func:`load_mnist` (file ``fashion_mnist.npz``)."""
  return _normalise(_load_arrays("fashion_mnist", path))
