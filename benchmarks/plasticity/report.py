"""Plots and markdown tables of the plasticity benchmarks' JSON results.

python -m benchmarks.plasticity.report benchmarks/figures/plasticity
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# read off the official figures (research notes, Section 6 / 12)
REGRESSION_TARGETS = {
  "bp_0.01": (0.62, 1.25),
  "bp_0.003": (0.70, 1.1),
  "bp_0.001": (0.84, 0.87),
  "linear_0.01": (0.88, 0.88),
}
PMNIST_BP_PEAK, PMNIST_BP_AT_110 = 0.933, 0.88


def _mean(r, key):
  return np.asarray(r[key], np.float64).mean(axis=0)  # over runs


def regression(res, out):
  fig, ax = plt.subplots(figsize=(7, 4))
  rows = [
    "| method | setting | runs | first bin | last bin | last 5 bins | figure (first → last) "
    "| dead units (end) | samples/s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in res["results"].items():
    err = _mean(r, "metric")
    ax.plot(np.arange(1, len(err) + 1) * res["meta"]["per_bin"], err, label=name)
    t = REGRESSION_TARGETS.get(name)
    fig_txt = f"≈ {t[0]} → {t[1]}" if t else "—"
    setting = ", ".join(f"{k} {v}" for k, v in r["spec"].items() if k not in ("name", "method"))
    dead = _mean(r, "dead")[-1]
    rows.append(
      f"| {name} | {setting} | {len(r['seeds'])} | {err[0]:.3f} | {err[-1]:.3f} | "
      f"{err[-5:].mean():.3f} | {fig_txt} | {dead:.2f} | {r['samples_per_s']:,.0f} |"
    )
  for name, (a, b) in REGRESSION_TARGETS.items():
    if name in res["results"]:
      ax.scatter([res["meta"]["steps"]], [b], marker="x", color="k")
  ax.set(
    xlabel="examples",
    ylabel="squared error per bin (mean over runs)",
    title="slowly-changing regression (x: figure's end values)",
  )
  ax.legend(fontsize=7)
  fig.savefig(out / "regression.png", dpi=110, bbox_inches="tight")
  return "\n".join(rows)


def _running_below(acc, level, window=10):
  """The first task where the mean of the last ``window`` tasks is below ``level`` (or "—")."""
  if len(acc) < window:
    return "—"
  run = np.convolve(acc, np.ones(window) / window, mode="valid")
  below = np.flatnonzero(run < level)
  return str(int(below[0]) + window) if below.size else "—"


def pmnist(results, out):
  """Per method: the seed-mean curves; the peak and the decline against the figure."""
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  rows = [
    "| method | setting | seeds | tasks | task 1 | best (task) | tasks 21-30 | tasks 51-60 | "
    "tasks 91-100 | tasks 101-120 | last | first 10-task mean < 0.88 | dead | eff. rank | "
    "mean |w| | samples/s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    acc = _mean(r, "metric")
    x = np.arange(1, len(acc) + 1)
    for ax, key in zip(axes, ("metric", "dead", "erank", "weight")):
      ax.plot(x, _mean(r, key), label=name, lw=0.9)
    setting = ", ".join(f"{k} {v}" for k, v in r["spec"].items() if k not in ("name", "method"))
    h = {k: _mean(r, k)[-1] for k in ("dead", "erank", "weight")}
    spans = [(20, 30), (50, 60), (90, 100), (100, 120)]
    mid = " | ".join(f"{acc[a:b].mean():.4f}" if len(acc) >= b else "—" for a, b in spans)
    rate = min(r["samples_per_s"]) if isinstance(r["samples_per_s"], list) else r["samples_per_s"]
    rows.append(
      f"| {name} | {setting} | {len(r['seeds'])} | {len(acc)} | {acc[0]:.4f} | "
      f"{acc.max():.4f} ({int(acc.argmax()) + 1}) | {mid} | {acc[-1]:.4f} | "
      f"{_running_below(acc, PMNIST_BP_AT_110)} | {h['dead']:.3f} | {h['erank']:.1f} | "
      f"{h['weight']:.4f} | {rate:,.0f} |"
    )
  axes[0].axhline(PMNIST_BP_PEAK, ls="--", c="k", lw=0.8, label="BP peak (figure)")
  axes[0].axhline(PMNIST_BP_AT_110, ls=":", c="k", lw=0.8, label="BP < 0.88 by task 110")
  axes[0].axvline(110, ls=":", c="grey", lw=0.6)
  for ax, t in zip(
    axes, ("online accuracy", "dead units", "effective rank (last hidden)", "mean |w| (kernels)")
  ):
    ax.set(xlabel="task", title=t)
  axes[0].legend(fontsize=6)
  fig.savefig(out / "pmnist.png", dpi=110, bbox_inches="tight")
  return "\n".join(rows)


def merge_seeds(parts):
  """The ``results`` of several runs as one dict: a method's seeds from several files
  concatenated (same number of tasks), its samples/s kept per file."""
  out = {}
  for res in parts:
    for name, v in res["results"].items():
      v = {**v, "samples_per_s": [v["samples_per_s"]]}
      if name not in out:
        out[name] = v
        continue
      have = out[name]
      if len(have["metric"][0]) != len(v["metric"][0]):
        n, m = len(have["metric"][0]), len(v["metric"][0])
        raise ValueError(f"{name}: runs of {n} and {m} tasks cannot be merged")
      for k in ("metric", "dead", "erank", "weight", "seeds", "samples_per_s"):
        have[k] = have[k] + v[k]
  return out


def chain(res, out):
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
  rows = [
    "| method | tasks | ACC | BWT | forgetting | mean new-task acc | last new-task acc |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in res["results"].items():
    R = np.asarray(r["R"])
    ax[0].plot(np.arange(1, len(R) + 1), np.diag(R), label=name)
    ax[1].plot(np.arange(1, len(R) + 1), [R[t, : t + 1].mean() for t in range(len(R))], label=name)
    rows.append(
      f"| {name} | {len(R)} | {r['acc']:.4f} | {r['bwt']:.4f} | {r['forgetting']:.4f} |"
      f" {np.mean(np.diag(R)):.4f} | {R[-1, -1]:.4f} |"
    )
  ax[0].set(xlabel="task", title="test accuracy on the task just learnt (plasticity)")
  ax[1].set(xlabel="task", title="mean test accuracy on the tasks seen (stability)")
  ax[1].legend(fontsize=7)
  fig.savefig(out / "chain.png", dpi=110, bbox_inches="tight")
  return "\n".join(rows)


# the result files, in table order (`RESULTS.md` gives the command of each)
REGRESSION_FILES = ("regression.json", "regression_30_a.json", "regression_30_redo.json")
PMNIST_FILES = (
  "pmnist_bp150.json",
  "pmnist_bp150_s12.json",
  "pmnist_cbp60.json",
  "pmnist_redo30.json",
  "pmnist_l2_100.json",
  "pmnist_adam30.json",
  "pmnist_snp5.json",
  "pmnist_c.json",
)


def main(argv=None):
  d = pathlib.Path((argv or sys.argv[1:])[0])
  load = lambda n: json.loads((d / n).read_text()) if (d / n).exists() else None  # noqa: E731
  parts = []
  if found := [r for n in REGRESSION_FILES if (r := load(n))]:
    r = found[0]
    for more in found[1:]:
      r["results"].update(more["results"])
    parts.append("## Slowly-changing regression\n\n" + regression(r, d))
  if found := [r for n in PMNIST_FILES if (r := load(n))]:
    parts.append("## Online permuted MNIST\n\n" + pmnist(merge_seeds(found), d))
  if r := load("pmnist_speed.json"):
    rows = ["| method | samples/s | × BP |", "|---|---|---|"]
    bp = r["results"]["bp"]["samples_per_s"]
    for name, v in r["results"].items():
      rows.append(f"| {name} | {v['samples_per_s']:,.0f} | {v['samples_per_s'] / bp:.2f} |")
    parts.append("## Speed, one process\n\n" + "\n".join(rows))
  if r := load("chain.json"):
    parts.append("## Stability-plasticity chain\n\n" + chain(r, d))
  (d / "tables.md").write_text("\n\n".join(parts) + "\n")
  print("\n\n".join(parts))


if __name__ == "__main__":
  main()
