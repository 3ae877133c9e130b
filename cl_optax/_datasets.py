"""Built-in data for :mod:`cl_optax.streams`: scikit-learn's digits, and MNIST /
Fashion-MNIST from a local ``.npz`` or IDX folder. Nothing here downloads."""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import NamedTuple

import numpy as np

ENV_VAR = "CL_OPTAX_DATA"


class Dataset(NamedTuple):
  """Train and test arrays. ``x_test``/``y_test`` are ``None`` when the
  source has no official test split (scikit-learn's digits)."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray | None
  y_test: np.ndarray | None


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


def read_idx(path: str | os.PathLike) -> np.ndarray:
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


def _load_arrays(name: str, path) -> tuple[np.ndarray, ...]:
  """The four raw arrays ``x_train, y_train, x_test, y_test`` of ``name`` (``uint8`` images)."""
  looked = []
  for cand in _candidates(name, path):
    looked.append(str(cand))
    if cand.suffix == ".npz" and cand.is_file():
      with np.load(cand) as z:
        missing = [k for k in _IDX if k not in z.files]
        if missing:
          raise ValueError(f"load_{name}: {cand} lacks the arrays {missing}; it has {z.files}.")
        return tuple(np.asarray(z[k]) for k in _IDX)
    if cand.is_dir():
      found = {k: _find_idx(cand, stem) for k, stem in _IDX.items()}
      if all(found.values()):
        return tuple(read_idx(p) for p in found.values() if p is not None)
  raise FileNotFoundError(
    f"load_{name}: no {name} data found. Looked for `{name}.npz` (arrays x_train, y_train, "
    f"x_test, y_test) or the four IDX files ({', '.join(_IDX.values())}, optionally .gz) in: "
    f"{', '.join(looked)}. Pass path= (a .npz file or a folder) or set {ENV_VAR}. "
    f"Get the files from {_SOURCES[name]}; nothing is downloaded automatically."
  )


def _normalise(arrays: tuple[np.ndarray, ...]) -> Dataset:
  """Images to float32 ``[n, 28, 28]`` in [0, 1], labels to int32."""
  x_train, y_train, x_test, y_test = arrays
  return Dataset(
    (x_train.astype(np.float32) / 255.0).reshape(len(x_train), 28, 28),
    y_train.astype(np.int32),
    (x_test.astype(np.float32) / 255.0).reshape(len(x_test), 28, 28),
    y_test.astype(np.int32),
  )


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
