"""Accuracy-matrix heatmaps shared by the examples."""

from __future__ import annotations

import pathlib

import numpy as np


def save_heatmaps(
  results: dict, out: pathlib.Path, *, vmin: float = 0.0, lower_only: bool = False
) -> pathlib.Path:
  """One heatmap per method of its seed-mean accuracy matrix; returns the PNG path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6))
  for ax, (method, mats) in zip(np.atleast_1d(axes), results.items()):
    mean = np.mean(mats, 0)
    im = ax.imshow(mean, vmin=vmin, vmax=1.0, cmap="viridis")
    ax.set(title=method, xlabel="evaluated on task j", ylabel="after training task i")
    for (i, j), v in np.ndenumerate(mean):
      if j <= i or not lower_only:
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(im, ax=axes, shrink=0.8)
  path = out / "accuracy_matrices.png"
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path
