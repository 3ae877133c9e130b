"""cl_optax.streams: shapes, determinism, disjoint splits, rotations, loaders."""

import gzip
import os
import pathlib

import numpy as np
import pytest

from cl_optax import streams

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = pathlib.Path(os.environ.get("CL_OPTAX_TEST_DATA", DATA))


def _toy(n_per_class=10, n_classes=4, shape=(3, 3), seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(n_classes), n_per_class)
  x = rng.random((len(y), *shape), dtype=np.float32)
  return x, y


# ------------------------------------------------------------------- split


@pytest.mark.parametrize("scenario", streams.SCENARIOS)
def test_split_digits_shapes_and_disjoint(scenario):
  ds = streams.load_digits()
  assert ds.x_train.shape == (1797, 64) and ds.x_train.dtype == np.float32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_test is None
  s = streams.split(ds.x_train, ds.y_train, classes_per_task=2, scenario=scenario, seed=0)
  assert len(s) == 5 and s.scenario == scenario
  assert s.n_outputs == {"task": 10, "domain": 2, "class": 10}[scenario]
  seen_classes, all_rows = [], []
  for t, task in enumerate(s):
    assert task.classes.tolist() == [2 * t, 2 * t + 1]
    xtr, ytr = task.train()
    xte, yte = task.test()
    assert xtr.shape[1:] == (64,) and xte.shape[1:] == (64,)
    assert ytr.dtype == np.int32
    # held-out split: train and test rows disjoint, together all rows of these classes
    rows = np.concatenate([task.train_index, task.test_index])
    assert len(np.unique(rows)) == len(rows) == np.isin(ds.y_train, task.classes).sum()
    assert len(task.test_index) == len(rows) - int(0.8 * len(rows))
    assert set(ds.y_train[rows].tolist()) == set(task.classes.tolist())
    all_rows.append(rows)
    seen_classes += task.classes.tolist()
    if scenario == "class":
      assert set(ytr.tolist()) == set(task.classes.tolist())
      assert s.train_valid[t].tolist() == [c < 2 * t + 2 for c in range(10)]
      assert s.columns[t].tolist() == list(range(10))
    else:
      assert set(ytr.tolist()) == {0, 1}
      np.testing.assert_array_equal(ds.y_train[task.train_index] - 2 * t, ytr)
      assert s.train_valid[t].all()
      expected_cols = [2 * t, 2 * t + 1] if scenario == "task" else [0, 1]
      assert s.columns[t].tolist() == expected_cols
  assert len(set(seen_classes)) == 10
  assert len(np.unique(np.concatenate(all_rows))) == 1797  # class groups are disjoint
  if scenario == "class":
    assert s.eval_valid.all()


def test_split_seed_changes_holdout_only():
  x, y = _toy()
  a = streams.split(x, y, classes_per_task=2, seed=0)
  b = streams.split(x, y, classes_per_task=2, seed=0)
  c = streams.split(x, y, classes_per_task=2, seed=1)
  np.testing.assert_array_equal(a[0].train_index, b[0].train_index)
  assert not np.array_equal(a[0].train_index, c[0].train_index)
  assert set(a[0].train_index) | set(a[0].test_index) == set(c[0].train_index) | set(
    c[0].test_index
  )


def test_split_with_test_set_and_groups():
  x, y = _toy()
  xt, yt = _toy(n_per_class=3, seed=1)
  s = streams.split(x, y, groups=[(3,), (0, 2)], test=(xt, yt), scenario="task")
  assert s.columns.tolist() == [[3, 3], [0, 2]] and s.train_valid.tolist() == [
    [True, False],
    [True, True],
  ]
  xte, yte = s[1].test()
  assert len(yte) == 6 and set(yte.tolist()) == {0, 1}
  np.testing.assert_array_equal(xte, xt[np.isin(yt, [0, 2])])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(groups=[(0, 1), (1, 2)]), "disjoint"),
    (dict(classes_per_task=3), "cannot be split"),
    (dict(scenario="joint"), "scenario must be one of"),
    (dict(groups=[(0, 7)]), r"classes \[7\]"),
    (dict(groups=[(0,), (1, 2)], scenario="domain"), "equal size"),
    (dict(test_fraction=1.0), "test_fraction"),
  ],
)
def test_split_errors(kwargs, match):
  x, y = _toy()
  with pytest.raises(ValueError, match=match):
    streams.split(x, y, **kwargs)


def test_bad_xy():
  with pytest.raises(ValueError, match="y must have shape"):
    streams.split(np.zeros((4, 2)), np.zeros(3, int))
  with pytest.raises(ValueError, match="integer class labels"):
    streams.split(np.zeros((4, 2)), np.zeros(4))
  with pytest.raises(ValueError, match=r"shape \[n, \.\.\.features\]"):
    streams.permuted(np.zeros(4), np.zeros(4, int), n_tasks=2)


# ---------------------------------------------------------------- permuted


def test_permuted_determinism_and_shapes():
  x, y = _toy()
  a = streams.permuted(x, y, n_tasks=3, seed=5)
  b = streams.permuted(x, y, n_tasks=3, seed=5)
  c = streams.permuted(x, y, n_tasks=3, seed=6)
  assert len(a) == 3 and a.n_outputs == 4 and a.scenario == "domain"
  for t in range(3):
    xa, ya = a[t].train()
    assert xa.shape == (40, 9)
    np.testing.assert_array_equal(xa, b[t].train()[0])
    assert not np.array_equal(xa, c[t].train()[0])
    np.testing.assert_array_equal(ya, y)
    # a permutation: every row holds the same multiset of values
    np.testing.assert_array_equal(np.sort(xa, 1), np.sort(x.reshape(40, -1), 1))
  assert not np.array_equal(a[0].train()[0], a[1].train()[0])
  # the permutation is fixed per task: train and test use the same one
  flat = x.reshape(40, -1)
  xa0 = a[0].train()[0]
  perm = [int(np.flatnonzero((flat == xa0[:, [k]]).all(0))[0]) for k in range(9)]
  np.testing.assert_array_equal(a[0].test()[0], flat[:, perm])


def test_permuted_identity_and_subsets():
  x, y = _toy()
  s = streams.permuted(x, y, n_tasks=2, seed=0, first_identity=True, n_train=7)
  xa, ya = s[0].train()
  assert xa.shape == (7, 9)
  np.testing.assert_array_equal(xa, x.reshape(40, -1)[s[0].train_index])
  assert s[0].n_train == 7 and s[0].n_test == 40
  assert not np.array_equal(s[0].train_index, s[1].train_index)
  with pytest.raises(ValueError, match="n_train must be in"):
    streams.permuted(x, y, n_tasks=2, n_train=41)
  with pytest.raises(ValueError, match="n_tasks must be a positive int"):
    streams.permuted(x, y, n_tasks=0)


# ----------------------------------------------------------------- rotated


def test_rotation_90_matches_rot90():
  img = np.arange(6 * 6, dtype=np.float32).reshape(1, 6, 6)
  for degrees, k in ((90, 1), (180, 2), (270, 3)):
    s = streams.rotated(img, np.zeros(1, int), angles=[degrees])
    np.testing.assert_allclose(s[0].train()[0], np.rot90(img, k, axes=(1, 2)))
  for interp in ("nearest", "bilinear"):
    s = streams.rotated(img, np.zeros(1, int), angles=[0.0], interpolation=interp)
    np.testing.assert_allclose(s[0].train()[0], img, atol=1e-5)


def test_rotation_bilinear_against_reference():
  rng = np.random.default_rng(0)
  img = rng.random((5, 7)).astype(np.float32)
  deg = 33.0
  out = streams.rotated(img[None], np.zeros(1, int), angles=[deg], interpolation="bilinear")[0]
  got = out.train()[0][0]
  # plain-loop reference: inverse-rotate each output pixel, bilinear, zero outside
  h, w = img.shape
  cy, cx, th = (h - 1) / 2, (w - 1) / 2, np.deg2rad(deg)
  ref = np.zeros_like(img)
  for r in range(h):
    for c in range(w):
      xo, yo = c - cx, cy - r
      xs = np.cos(th) * xo + np.sin(th) * yo
      ys = -np.sin(th) * xo + np.cos(th) * yo
      sr, sc = cy - ys, xs + cx
      r0, c0 = int(np.floor(sr)), int(np.floor(sc))
      for rr, cc in ((r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)):
        if 0 <= rr < h and 0 <= cc < w:
          ref[r, c] += (1 - abs(sr - rr)) * (1 - abs(sc - cc)) * img[rr, cc]
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_rotated_angles_like_gem():
  x, y = _toy(shape=(4, 4))
  s = streams.rotated(x, y, n_tasks=20, seed=3)
  angles = [float(t.name.split()[1]) for t in s]
  for t, a in enumerate(angles):
    assert 9 * t <= a < 9 * (t + 1) + 0.05
  assert angles == [float(t.name.split()[1]) for t in streams.rotated(x, y, n_tasks=20, seed=3)]
  flat = streams.rotated(x.reshape(40, 16), y, n_tasks=2, image_shape=(4, 4), seed=3)
  square = streams.rotated(x, y, n_tasks=2, seed=3)
  np.testing.assert_allclose(flat[1].train()[0].reshape(40, 4, 4), square[1].train()[0])
  with pytest.raises(ValueError, match="image_shape"):
    streams.rotated(x.reshape(40, 16), y, n_tasks=2)
  with pytest.raises(ValueError, match="interpolation"):
    streams.rotated(x, y, n_tasks=2, interpolation="cubic")


# ------------------------------------------------------------------ loaders


def _write_idx(path, arr, gz):
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  data = header + arr.astype(np.uint8).tobytes()
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def test_minibatches_one_shuffled_pass():
  x = np.arange(23, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  y = np.arange(23) % 4
  got = list(streams.minibatches(x, y, 5, np.random.default_rng(1)))
  assert [b.shape for b, _ in got] == [(5, 3)] * 4  # 23 // 5 batches, the remainder dropped
  seen = np.concatenate([b[:, 0] for b, _ in got]).astype(int)
  assert len(set(seen)) == 20 and not np.array_equal(seen, np.arange(20))  # no repeats, shuffled
  for b, t in got:
    np.testing.assert_array_equal(t, b[:, 0].astype(int) % 4)  # pairs stay together
  again = list(streams.minibatches(x, y, 5, np.random.default_rng(1)))
  np.testing.assert_array_equal(
    np.concatenate([b for b, _ in again]), np.concatenate([b for b, _ in got])
  )
  with pytest.raises(
    ValueError, match=r"minibatches: batch_size must be an int in \[1, 23\].*got 0"
  ):
    next(streams.minibatches(x, y, 0, np.random.default_rng(0)))
  with pytest.raises(
    ValueError, match=r"minibatches: y must have shape \[n\] with n = len\(x\) = 23"
  ):
    next(streams.minibatches(x, y[:5], 5, np.random.default_rng(0)))


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx_folder(tmp_path, gz):
  rng = np.random.default_rng(0)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)),
    "train-labels-idx1-ubyte": rng.integers(0, 10, 6),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28)),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, 2),
  }
  for name, arr in arrays.items():
    _write_idx(tmp_path / name, arr, gz)
  ds = streams.load_mnist(tmp_path)
  np.testing.assert_allclose(ds.x_train, arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32


def test_load_mnist_npz_env_var(tmp_path, monkeypatch):
  z = {
    "x_train": np.full((3, 28, 28), 255, np.uint8),
    "y_train": np.arange(3, dtype=np.uint8),
    "x_test": np.zeros((1, 28, 28), np.uint8),
    "y_test": np.zeros(1, np.uint8),
  }
  np.savez(tmp_path / "fashion_mnist.npz", **z)
  monkeypatch.setenv(streams.ENV_VAR, str(tmp_path))
  ds = streams.load_fashion_mnist()
  assert ds.x_train.max() == 1.0 and ds.y_train.tolist() == [0, 1, 2]


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.delenv(streams.ENV_VAR, raising=False)
  with pytest.raises(
    FileNotFoundError, match=r"(?s)Looked for `mnist.npz`.*nothing-here.*CL_OPTAX_DATA"
  ):
    streams.load_mnist(tmp_path / "nothing-here")
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
    streams.read_idx(tmp_path / "bad")


def _mnist_path():
  if (DATA / "mnist.npz").is_file():
    return DATA
  if os.environ.get("CI"):
    pytest.fail(f"CI is set but MNIST is missing at {DATA} (set CL_OPTAX_TEST_DATA)")
  pytest.skip(f"MNIST not found at {DATA}/mnist.npz (shared data absent outside CI)")


def test_shared_mnist_permuted_stream():
  ds = streams.load_mnist(_mnist_path() / "mnist.npz")
  assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
  assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]
  s = streams.permuted(ds.x_train, ds.y_train, n_tasks=3, test=(ds.x_test, ds.y_test), n_train=1000)
  xtr, ytr = s[2].train()
  xte, yte = s[2].test()
  assert xtr.shape == (1000, 784) and xte.shape == (10000, 784)
  np.testing.assert_array_equal(yte, ds.y_test)


def test_core_import_does_not_pull_optional_packages():
  import subprocess
  import sys

  code = (
    "import sys, cl_optax; cl_optax.streams.split; "
    "bad = [m for m in ('sklearn', 'matplotlib', 'flax', 'tqdm') if m in sys.modules]; "
    "assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
