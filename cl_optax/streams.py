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

Boundary-free streams (Dohare et al., 2024), jittable generators driven by
a cursor inside one ``lax.scan``: :func:`online_permuted` (online permuted
MNIST, composed permutations, examples once) and
:func:`slowly_changing_regression`.

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

from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike

from cl_optax._datasets import ENV_VAR as ENV_VAR
from cl_optax._datasets import Dataset as Dataset
from cl_optax._datasets import load_digits as load_digits
from cl_optax._datasets import load_fashion_mnist as load_fashion_mnist
from cl_optax._datasets import load_mnist as load_mnist
from cl_optax._datasets import read_idx as read_idx
from cl_optax._domain_streams import permuted as permuted
from cl_optax._domain_streams import rotated as rotated
from cl_optax._image_maps import rotation_weights as rotation_weights
from cl_optax._online_streams import OnlinePermuted as OnlinePermuted
from cl_optax._online_streams import PermutedCursor as PermutedCursor
from cl_optax._online_streams import RegressionCursor as RegressionCursor
from cl_optax._online_streams import SlowlyChangingRegression as SlowlyChangingRegression
from cl_optax._online_streams import online_permuted as online_permuted
from cl_optax._online_streams import slowly_changing_regression as slowly_changing_regression
from cl_optax._split_stream import split as split
from cl_optax._stream_checks import SCENARIOS as SCENARIOS
from cl_optax._stream_checks import check_xy
from cl_optax._stream_types import Stream as Stream
from cl_optax._stream_types import Task as Task

__all__ = [
  "ENV_VAR",
  "SCENARIOS",
  "Dataset",
  "OnlinePermuted",
  "PermutedCursor",
  "RegressionCursor",
  "SlowlyChangingRegression",
  "Stream",
  "Task",
  "load_digits",
  "load_fashion_mnist",
  "load_mnist",
  "minibatches",
  "online_permuted",
  "permuted",
  "read_idx",
  "rotated",
  "rotation_weights",
  "slowly_changing_regression",
  "split",
]


def minibatches(
  x: ArrayLike, y: ArrayLike, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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
  x, y = check_xy(x, y, "minibatches")
  if not (isinstance(batch_size, int | np.integer) and 0 < batch_size <= len(x)):
    raise ValueError(
      f"minibatches: batch_size must be an int in [1, {len(x)}] (the examples); got {batch_size!r}."
    )
  order = rng.permutation(len(x))
  for i in range(0, len(x) - batch_size + 1, batch_size):
    j = order[i : i + batch_size]
    yield x[j], y[j]
