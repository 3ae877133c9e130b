"""Results: the terminal table and the PNG plots of a list of run records."""

from __future__ import annotations

import pathlib

import numpy as np


def sample_std(v, axis=0):
  """The standard deviation over seeds with Bessel's correction (0 for one seed)."""
  v = np.asarray(v, float)
  return v.std(axis, ddof=1) if v.shape[axis] > 1 else np.zeros_like(v.mean(axis))


def mean_std(values, scale=100.0):
  """(mean, std over seeds with Bessel's correction) of the non-None values, scaled
  (percent by default); (nan, 0) when there are none."""
  v = np.asarray([x for x in values if x is not None], float) * scale
  return (v.mean(), sample_std(v)) if len(v) else (np.nan, 0.0)


def fmt(values, scale=100.0, prec=2):
  """``mean ± std`` of `mean_std`, or ``-`` when every value is None."""
  if all(x is None for x in values):
    return "-"
  mean, std = mean_std(values, scale)
  return f"{mean:.{prec}f} ± {std:.{prec}f}"


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


# Distinct colours (tab10, then tab20's lighter shades) and markers: each method gets a
# colour AND a marker, so no two methods share a style up to 20 methods.
_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
  "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def styles(methods: list[str]) -> dict[str, dict]:
  """``{method: {"color": ..., "marker": ...}}``, distinct for up to 20 methods."""
  return {
    m: {"color": _COLOURS[i % len(_COLOURS)], "marker": _MARKERS[i % len(_MARKERS)]}
    for i, m in enumerate(methods)
  }


def _heatmap_grid(by: dict, plt, out: pathlib.Path) -> pathlib.Path:
  n = len(by)
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  T = len(next(iter(by.values()))[0]["acc_matrix"])
  size = 1.0 + 0.42 * T
  fig, axes = plt.subplots(
    rows, cols, figsize=(cols * size, rows * size), squeeze=False, layout="constrained"
  )
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  for ax, (m, rs) in zip(axes.ravel(), by.items()):
    R = np.mean([r["acc_matrix"] for r in rs], 0)
    im = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    ax.set_title(f"{m} (ACC {100 * np.mean([r['acc'] for r in rs]):.1f})", fontsize=9)
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.tick_params(labelsize=6)
    if len(R) <= 10:
      for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="w")
  fig.supxlabel("evaluated on task j")
  fig.supylabel("after training task i")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy (%)")
  path = out / "heatmaps.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _scatter(by, style, plt, out, xkey, xlabel, name, *, xscale=100.0, logx=False):
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for m, rs in by.items():
    (x, xs), (y, ys) = mean_std([r.get(xkey) for r in rs], xscale), mean_std([r["acc"] for r in rs])
    ax.errorbar(x, y, xerr=xs, yerr=ys, ls="none", ms=8, label=m, **style[m])
    ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
  if logx:
    ax.set_xscale("log")
  title = next(iter(by.values()))[0]["stream"]
  ax.set(xlabel=xlabel, ylabel="average accuracy after the last task (%)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2, loc="best")
  path = out / name
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def save_plots(records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """``heatmaps.png`` (every method's mean accuracy matrix in one grid),
  ``acc_vs_forgetting.png``, ``acc_vs_speed.png`` (samples/s, log scale) and
  ``avg_accuracy.png`` (average accuracy vs tasks seen); one colour and marker per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  by = by_method([r for r in records if not r.get("diverged")])  # no matrix to plot
  if not by:
    return []
  style = styles(list(by))
  paths = [
    _heatmap_grid(by, plt, out),
    _scatter(by, style, plt, out, "forgetting", "forgetting (%)", "acc_vs_forgetting.png"),
    _scatter(
      by,
      style,
      plt,
      out,
      "samples_per_s",
      "training samples / s (log)",
      "acc_vs_speed.png",
      xscale=1.0,
      logx=True,
    ),  # fmt: skip
  ]
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, rs in by.items():
    curves = 100 * np.asarray([r["acc_curve"] for r in rs])
    x = np.arange(1, curves.shape[1] + 1)
    mean, std = curves.mean(0), sample_std(curves)
    ax.plot(x, mean, ms=5, label=m, **style[m])
    ax.fill_between(x, mean - std, mean + std, alpha=0.12, color=style[m]["color"])
  ax.set(xlabel="tasks seen", ylabel="average accuracy on tasks seen (%)", title=rs[0]["stream"])
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  path = out / "avg_accuracy.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  paths.append(path)
  return paths
