"""The table, JSON and plots of :mod:`benchmarks.lm_adapters`."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def summary(mat: np.ndarray) -> dict:
  """Row 0: after pre-training; row i: after domain i (joint: one row). Column 0: general."""
  n = mat.shape[0] - 1
  forget = [mat[-1, j] - mat[j:n, j].min() for j in range(1, n)]
  return {
    "final_avg_loss": float(mat[-1, 1:].mean()),
    "forgetting": float(np.mean(forget)) if forget else float("nan"),
    "general_forgetting": float(mat[-1, 0] - mat[0, 0]),
  }


def _cell(xs) -> str:
  xs = np.asarray(xs, float)
  if np.all(np.isnan(xs)):
    return "—"
  return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"


def table(results: dict) -> tuple[str, dict]:
  """The markdown table and the per-method numbers (tokens/s relative to ``adam``)."""
  ref = np.mean([r[3] for r in results["adam"]]) if "adam" in results else None
  rows, numbers = [], {}
  cols = ("final avg loss", "forgetting", "general forgetting", "trainable", "state bytes")
  rows += ["| method | " + " | ".join(cols) + " | tokens/s vs full FT |", "|" + "---|" * 7]
  for m, runs in results.items():
    s = [summary(r[0]) for r in runs]
    speed = [r[3] for r in runs]
    numbers[m] = {k: [x[k] for x in s] for k in s[0]} | {
      "trainable": runs[0][1],
      "state_bytes": runs[0][2],
      "tokens_per_s": speed,
    }
    rel = f"{np.mean(speed) / ref:.2f}×" if ref else "—"
    rows.append(
      f"| {m} | {_cell(numbers[m]['final_avg_loss'])} | {_cell(numbers[m]['forgetting'])} | "
      f"{_cell(numbers[m]['general_forgetting'])} | {runs[0][1]:,} | {runs[0][2]:,} | {rel} |"
    )
  return "\n".join(rows), numbers


def _plots(results: dict, numbers: dict, names: list, out: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  seq = {m: np.mean([r[0] for r in v], 0) for m, v in results.items() if m != "joint"}
  lo = min(x.min() for x in seq.values())
  hi = max(x.max() for x in seq.values())
  fig, axes = plt.subplots(1, len(seq), figsize=(4.2 * len(seq), 3.8), layout="constrained")
  rows = ["pre-trained"] + [f"after {n}" for n in names[1:]]
  for ax, (m, mat) in zip(np.atleast_1d(axes), seq.items()):
    im = ax.imshow(mat, cmap="magma_r", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"{m} (nats/byte)", fontsize=9)
    for (i, j), v in np.ndenumerate(mat):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
              color="w" if v > lo + 0.6 * (hi - lo) else "k")  # fmt: skip
  fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8)
  heat = out / "loss_matrices.png"
  fig.savefig(heat, dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5.2, 4), layout="constrained")
  ref = np.mean(numbers["adam"]["tokens_per_s"]) if "adam" in numbers else 1.0
  for m, n in numbers.items():
    if m == "joint":
      continue
    x, y = np.mean(n["tokens_per_s"]) / ref, np.mean(n["forgetting"])
    ax.scatter(x, y)
    ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set(xlabel="training tokens/s relative to full fine-tuning", ylabel="forgetting (nats/byte)")
  scatter = out / "forgetting_vs_speed.png"
  fig.savefig(scatter, dpi=110)
  plt.close(fig)
  return [heat, scatter]


def report(results, names, cfg, n_base, wall, out: pathlib.Path) -> dict:
  """Prints and saves the table, the JSON of every number and the plots; returns the numbers."""
  out.mkdir(parents=True, exist_ok=True)
  md, numbers = table(results)
  for m, runs in results.items():
    print(f"\n{m}: held-out loss (nats/byte), mean over {len(runs)} seed(s); columns {names}")
    print(np.array2string(np.mean([r[0] for r in runs], 0), precision=3))
  print(f"\n{md}\n\nbase model {n_base / 1e6:.2f} M parameters; wall time {wall:.0f} s")
  doc = {
    "config": cfg,
    "corpora": names,
    "base_params": n_base,
    "wall_s": wall,
    "matrices": {m: [r[0].tolist() for r in v] for m, v in results.items()},
    "summary": numbers,
  }
  (out / "results.json").write_text(json.dumps(doc, indent=1))
  (out / "table.md").write_text(md + "\n")
  doc["plots"] = [str(p) for p in _plots(results, numbers, names, out)]
  print(f"plots: {doc['plots']}")
  return doc


def merge(paths: list[pathlib.Path], out: pathlib.Path) -> dict:
  """One report from several runs' ``results.json`` (e.g. seeds run in separate processes)."""
  docs = [json.loads((p / "results.json").read_text()) for p in paths]
  results: dict = {}
  for d in docs:
    for m, mats in d["matrices"].items():
      s = d["summary"][m]
      for i, mat in enumerate(mats):
        run = (np.asarray(mat), s["trainable"], s["state_bytes"], s["tokens_per_s"][i])
        results.setdefault(m, []).append(run)
  cfg = docs[0]["config"] | {"merged": [str(p) for p in paths]}
  wall = sum(d["wall_s"] for d in docs)
  return report(results, docs[0]["corpora"], cfg, docs[0]["base_params"], wall, out)
