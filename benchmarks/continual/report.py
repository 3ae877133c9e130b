"""Results: the terminal table and the PNG plots of a list of run records."""

from __future__ import annotations

import pathlib

import numpy as np


def fmt(values, scale=100.0, prec=2):
  """``mean ± std`` of the non-None values, scaled (percent by default)."""
  v = np.asarray([x for x in values if x is not None], float) * scale
  if not len(v):
    return "-"
  return f"{v.mean():.{prec}f} ± {v.std():.{prec}f}"


def by_method(records: list[dict]) -> dict[str, list[dict]]:
  by = {}
  for r in records:
    by.setdefault(r["method"], []).append(r)
  return by


def results_table(records: list[dict]) -> str:
  by = by_method(records)
  head = (
    f"{'method':<12}{'ACC (%)':>16}{'BWT (%)':>16}{'FWT (%)':>16}{'forgetting (%)':>17}"
    f"{'samples/s':>12}{'wall s':>9}"
  )
  lines = [head, "-" * len(head)]
  for m, rs in by.items():
    sps = np.mean([r["samples_per_s"] for r in rs if r["samples_per_s"]] or [np.nan])
    lines.append(
      f"{m:<12}{fmt([r['acc'] for r in rs]):>16}{fmt([r.get('bwt') for r in rs]):>16}"
      f"{fmt([r.get('fwt') for r in rs]):>16}{fmt([r.get('forgetting') for r in rs]):>17}"
      f"{sps:>12.0f}{np.mean([r['wall_s'] for r in rs]):>9.1f}"
    )
    bad = [r for r in rs if r.get("diverged")]
    if bad:
      tasks = sorted({r["diverged"]["task"] for r in bad})
      lines.append(
        f"{'':<12}diverged on task {', '.join(map(str, tasks))} in {len(bad)}/{len(rs)} "
        f"seed(s): {bad[0]['diverged']['reason']}"
      )
  return "\n".join(lines)


def save_plots(records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  by = by_method([r for r in records if not r.get("diverged")])  # no matrix to plot
  paths = []
  if not by:
    return paths
  for m, rs in by.items():
    R = np.mean([r["acc_matrix"] for r in rs], 0)
    T = len(R)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * T, 0.9 + 0.4 * T))
    im = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    ax.set(
      title=f"{m}: accuracy (%), mean of {len(rs)} seed(s)",
      xlabel="evaluated on task j",
      ylabel="after training task i",
    )
    if T <= 20:
      for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    path = out / f"heatmap_{m.replace('/', '_')}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, rs in by.items():
    curves = 100 * np.asarray([r["acc_curve"] for r in rs])
    x = np.arange(1, curves.shape[1] + 1)
    mean, std = curves.mean(0), curves.std(0)
    ax.plot(x, mean, marker="o", ms=3, label=m)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  ax.set(xlabel="tasks seen", ylabel="average accuracy on tasks seen (%)", title=rs[0]["stream"])
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend()
  path = out / "avg_accuracy.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  paths.append(path)
  return paths
