"""Per-task input maps of :mod:`cl_optax.streams`: pixel permutations and rotations."""

from __future__ import annotations

import numpy as np


def permute(perm):
  return lambda x: x.reshape(len(x), -1)[:, perm]


def rotation_weights(
  shape: tuple[int, int], degrees: float, *, interpolation: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
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


def rotate(shape, degrees, interpolation):
  index, weight = rotation_weights(shape, degrees, interpolation=interpolation)

  def apply(x):
    flat = x.reshape(len(x), -1).astype(np.float32, copy=False)
    out = np.zeros_like(flat)
    for i, wt in zip(index, weight):
      out += flat[:, i] * wt
    return out.reshape(x.shape)

  return apply
