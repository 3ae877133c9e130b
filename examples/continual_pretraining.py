"""DAS soft-masking in continual pre-training of a small Flax NNX byte-level LM.

The corpora are text every Python installation has: the standard library's own
files, read from disk (no downloads). A causal Transformer LM is pre-trained on
a "general" corpus (the language reference prose in ``pydoc_data`` and a few
general-purpose modules), then trained on a sequence of domains (distinct
stdlib packages, one file set each), and evaluated after every stage on every
domain's held-out bytes. It compares

  adam   plain Adam through the whole stream
  das    Adam with DAS soft-masking (Ke et al., ICLR 2023): head and FFN-unit
         importance from gate gradients -- the proxy KL between two dropout
         passes on the first domain for the general knowledge, then each
         domain's own LM loss after training on it -- max-accumulated by
         ``cl_optax.consolidate``, and applied to Adam's update by
         ``cl_optax.soft_mask`` at unit level (``importance_shapes=``).
         ``--contrastive W`` adds DAS's contrastive loss with weight W
         (three extra forward passes per step, off by default for time).

It prints, per method, the held-out loss matrix (nats per byte; row = after
which stage, column = evaluated on which corpus), the final average loss and
perplexity over the domains, the forgetting (increase of a domain's loss from
its best earlier value to the end, averaged over all domains but the last) and
the general-corpus forgetting; then saves heatmaps and a JSON of every number.

  python examples/continual_pretraining.py --seeds 3 --out results/cpt

Departures from the paper's setting (RoBERTa-base, MLM, six real domains,
AdamW with the mask on the gradient): a 0.9M-parameter byte-level causal LM
pre-trained here for a few hundred steps, next-byte loss as the domain loss,
the mask applied to Adam's update (``chain(adam, soft_mask)``: Adam would
undo a constant gradient scale, see ``cl_optax.masking``), no learning-rate
schedule, and the contrastive loss off unless ``--contrastive`` is given.
The run is deterministic: the same seed gives the same numbers.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cl_optax
from cl_optax.importance import Batches, das_param_importance, das_units

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
from benchmarks.lm_model import ByteLM  # noqa: E402  the model, shared with the benchmarks

# The general corpus and the domains: (name, stdlib packages, what to read).
GENERAL = ("general", ("pydoc_data", "logging", "json", "http"), "source")
DOMAINS = (
  ("encodings", ("encodings",), "source"),  # codec tables
  ("asyncio", ("asyncio",), "source"),
  ("email-docs", ("email", "xml"), "docstrings"),  # prose only
  ("unittest", ("unittest",), "source"),
)


# ------------------------------------------------------------------- corpora
def _package_files(name: str) -> list[pathlib.Path]:
  spec = importlib.util.find_spec(name)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"standard-library package {name!r} not found")
  if spec.submodule_search_locations:
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    return sorted(p for p in root.rglob("*.py") if "test" not in p.parts)
  return [pathlib.Path(spec.origin)]


def _docstrings(source: str) -> str:
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return ""
  nodes = [tree] + [
    n
    for n in ast.walk(tree)
    if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
  ]
  return "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))


def load_corpus(packages, kind: str, max_bytes: int) -> np.ndarray:
  """The bytes of a corpus (files in sorted order, cut at ``max_bytes``) as uint8."""
  parts = []
  for name in packages:
    for path in _package_files(name):
      text = path.read_text(encoding="utf-8", errors="replace")
      parts.append(_docstrings(text) if kind == "docstrings" else text)
  data = "\n".join(parts).encode("utf-8", errors="replace")
  # Interleave the packages' bytes (blocks of 4 KiB) so a cut keeps all of them.
  blocks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
  order = np.random.default_rng(0).permutation(len(blocks))
  data = b"".join(blocks[i] for i in order)[:max_bytes]
  return np.frombuffer(data, np.uint8).astype(np.int32)


def split(data: np.ndarray, held_out: float = 0.1):
  cut = int(len(data) * (1 - held_out))
  return data[:cut], data[cut:]


def windows(data: np.ndarray, n: int, length: int, rng) -> np.ndarray:
  starts = rng.integers(0, len(data) - length - 1, n)
  return np.stack([data[s : s + length + 1] for s in starts])


# --------------------------------------------------------------------- model
def lm_loss(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def das_units_spec(model: ByteLM, gate_importance) -> dict:
  """``das_param_importance``'s ``units``: each layer's heads, FFN and output units."""
  spec = {}
  for layer in range(model.layers):
    spec[f"blocks/{layer}/attn"] = ("heads", gate_importance["heads"][layer])
    spec[f"blocks/{layer}/ffn_in"] = ("units", gate_importance["ffn"][layer])
    spec[f"blocks/{layer}/ffn_out"] = ("units", gate_importance["out"][layer])
  return spec


# ------------------------------------------------------------------ training
@nnx.jit
def train_step(model, optimizer, batch, key, negatives_gates, contrastive):
  def loss_fn(model):
    x, y = batch[:, :-1], batch[:, 1:]
    k1, k2, k3 = jax.random.split(key, 3)
    h1 = model.hidden(x, key=k1)
    loss = lm_loss(model.lm_head(h1), y)
    if contrastive is not None:  # DAS contrastive: full vs importance-gated sub-network
      h2 = model.hidden(x, key=k2)
      h3 = model.hidden(x, gates=negatives_gates, key=k3)
      z1, z2, z3 = (h.mean(axis=1) for h in (h1, h2, h3))
      loss = loss + contrastive * cl_optax.losses.das_contrastive(z2, z1, z3)
    return loss

  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


@nnx.jit
def eval_loss(model, batches):
  return jnp.mean(jax.vmap(lambda b: lm_loss(model(b[:, :-1]), b[:, 1:]))(batches))


def evaluate(model, held_out) -> list[float]:
  return [float(eval_loss(model, b)) for b in held_out]


def pretrain(cfg, general, seed):
  model = ByteLM(cfg, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(cfg["lr"]), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for step in range(cfg["pretrain_steps"]):
    batch = windows(general, cfg["batch"], cfg["length"], rng)
    train_step(model, optimizer, batch, jax.random.fold_in(key, step), None, None)
  return nnx.split(model)


def run_stream(method, cfg, pretrained, train, held_out, seed):
  """Trains ``method`` over the domains; returns the loss matrix [stages, corpora]."""
  graphdef, state = pretrained
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  rows = [evaluate(model, held_out)]
  if method == "adam":
    tx = optax.adam(cfg["lr"])
  else:
    params = nnx.state(model, nnx.Param)
    zero = jax.tree.map(jnp.zeros_like, model.ones_gates())
    shapes = das_param_importance(params, das_units_spec(model, zero))
    tx = optax.chain(optax.adam(cfg["lr"]), cl_optax.soft_mask(importance_shapes=shapes))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed + 1)  # training batches: the same for every method
  impt_rng = np.random.default_rng(seed + 2)  # importance batches (DAS only)
  key = jax.random.key(seed + 1)
  acc_gates = None  # accumulated gate importance (for the contrastive negatives)

  def consolidate(gate_imp):
    nonlocal acc_gates
    acc_gates = gate_imp if acc_gates is None else jax.tree.map(jnp.maximum, acc_gates, gate_imp)
    params = nnx.state(model, nnx.Param)
    imp = das_param_importance(params, das_units_spec(model, gate_imp))
    cl_optax.consolidate(optimizer, params, importance=imp)

  graph = nnx.graphdef(model)

  # Pure functions of (params, gates, batch, key), defined once per stream so
  # that das_units compiles once per loss.
  def gated_hidden(params, gates, batch, key):
    return nnx.merge(graph, params).hidden(batch[:, :-1], gates, key)

  def gated_logits(params, gates, batch, key):
    return nnx.merge(graph, params)(batch[:, :-1], gates, key)

  def own_loss(logits, batch):
    return lm_loss(logits, batch[:, 1:])

  def importance(data, loss, k):
    batches = Batches(
      jnp.stack(
        [windows(data, cfg["batch"], cfg["length"], impt_rng) for _ in range(cfg["impt_batches"])]
      )
    )
    fn = gated_hidden if loss == "proxy_kl" else gated_logits
    return das_units(
      fn, nnx.state(model), model.ones_gates(), batches, key=k, loss=loss, stacked=True
    )

  contrastive = cfg["contrastive"] if method == "das" and cfg["contrastive"] > 0 else None
  for t, data in enumerate(train):
    if method == "das" and t == 0:  # general knowledge: proxy KL on the first domain
      consolidate(importance(data, "proxy_kl", jax.random.fold_in(key, 10_000)))
    for step in range(cfg["steps"]):
      batch = windows(data, cfg["batch"], cfg["length"], rng)
      negatives = acc_gates if contrastive is not None else None
      train_step(
        model, optimizer, batch, jax.random.fold_in(key, t * 1000 + step), negatives, contrastive
      )
    rows.append(evaluate(model, held_out))
    if method == "das" and t + 1 < len(train):  # the domain's own-loss importance
      consolidate(importance(data, own_loss, jax.random.fold_in(key, 20_000 + t)))
  return np.array(rows)


# ------------------------------------------------------------------ metrics
def summary(mat: np.ndarray) -> dict:
  """Row 0: after pre-training; row i: after domain i. Column 0: general corpus."""
  n = mat.shape[0] - 1
  final = mat[-1, 1:]
  forget = [mat[-1, j] - mat[j:n, j].min() for j in range(1, n)]
  return {
    "final_avg_loss": float(final.mean()),
    "final_avg_ppl": float(np.exp(final).mean()),
    "forgetting": float(np.mean(forget)),
    "general_forgetting": float(mat[-1, 0] - mat[0, 0]),
  }


def save_heatmaps(results, names, out: pathlib.Path):
  """Mean loss matrix per method, plus ``das - adam`` when both ran."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out.mkdir(parents=True, exist_ok=True)
  panels = {m: np.mean(v, 0) for m, v in results.items()}
  lo = min(m.min() for m in panels.values())
  hi = max(m.max() for m in panels.values())
  if {"adam", "das"} <= set(panels):
    panels["das - adam"] = panels["das"] - panels["adam"]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), layout="constrained")
  rows = ["pre-trained"] + [f"after {n}" for n in names[1:]]
  for ax, (title, mat) in zip(np.atleast_1d(axes), panels.items()):
    diff = " - " in title
    span = np.abs(mat).max() if diff else None
    kw = {"cmap": "RdBu_r", "vmin": -span, "vmax": span} if diff else {"cmap": "magma_r"}
    im = ax.imshow(mat, **({} if diff else {"vmin": lo, "vmax": hi}), **kw)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(title=f"{title}: held-out loss (nats/byte)", xlabel="evaluated on")
    for (i, j), v in np.ndenumerate(mat):
      dark = (abs(v) > 0.6 * span) if diff else (v > lo + 0.6 * (hi - lo))
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    fig.colorbar(im, ax=ax, shrink=0.8)
  path = out / "loss_matrices.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="adam,das")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--domains", type=int, default=len(DOMAINS))
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--ff", type=int, default=512)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--pretrain-steps", type=int, default=400)
  parser.add_argument("--steps", type=int, default=150, help="steps per domain")
  parser.add_argument("--impt-batches", type=int, default=8)
  parser.add_argument("--contrastive", type=float, default=0.0)
  parser.add_argument("--max-bytes", type=int, default=400_000)
  parser.add_argument("--eval-windows", type=int, default=32)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/cpt"))
  args = parser.parse_args()
  cfg = {k.replace("-", "_"): v for k, v in vars(args).items() if k not in ("out", "methods")}

  corpora = [GENERAL, *DOMAINS[: args.domains]]
  names = [c[0] for c in corpora]
  data = [split(load_corpus(pk, kind, args.max_bytes)) for _, pk, kind in corpora]
  eval_rng = np.random.default_rng(1234)
  held_out = [
    windows(te, args.eval_windows, args.length, eval_rng).reshape(-1, 16, args.length + 1)
    for _, te in data
  ]
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(ByteLM(cfg, nnx.Rngs(0)), nnx.Param)))
  print(
    f"byte-level LM, {n_params / 1e6:.2f}M parameters; corpora (train/held-out KiB): "
    + ", ".join(f"{n} {len(tr) // 1024}/{len(te) // 1024}" for n, (tr, te) in zip(names, data))
    + f"; JAX on {jax.devices()[0].platform}"
  )
  results = {m: [] for m in args.methods.split(",")}
  start = time.perf_counter()
  for seed in range(args.seeds):
    general = data[0][0]
    pretrained = pretrain(cfg, general, seed)
    print(f"seed {seed}: pre-trained ({time.perf_counter() - start:.0f} s)", flush=True)
    for method in results:
      mat = run_stream(method, cfg, pretrained, [tr for tr, _ in data[1:]], held_out, seed)
      results[method].append(mat)
      s = summary(mat)
      print(
        f"seed {seed} {method:<5} final avg loss {s['final_avg_loss']:.3f}  "
        f"forgetting {s['forgetting']:.3f}  general forgetting {s['general_forgetting']:.3f}"
        f"  ({time.perf_counter() - start:.0f} s)",
        flush=True,
      )

  for method, mats in results.items():
    print(f"\n{method}: held-out loss (nats/byte), mean over seeds; rows: after", end=" ")
    print(["pre-training"] + names[1:], "\ncolumns:", names)
    print(np.array2string(np.mean(mats, 0), precision=3))
  head = ("final avg loss", "final avg ppl", "forgetting", "general forg.")
  print(f"\n{'method':<7}" + "".join(f"{h:>16}" for h in head))
  table = {}
  for method, mats in results.items():
    rows = [summary(m) for m in mats]
    table[method] = {k: [r[k] for r in rows] for k in rows[0]}
    cell = lambda k: f"{np.mean(table[method][k]):.4f}±{np.std(table[method][k]):.4f}"  # noqa: E731
    print(
      f"{method:<7}{cell('final_avg_loss'):>16}{cell('final_avg_ppl'):>16}"
      f"{cell('forgetting'):>16}{cell('general_forgetting'):>16}"
    )
  args.out.mkdir(parents=True, exist_ok=True)
  with open(args.out / "results.json", "w") as f:
    json.dump(
      {
        "config": cfg,
        "corpora": names,
        "matrices": {m: [x.tolist() for x in v] for m, v in results.items()},
        "summary": table,
      },
      f,
      indent=1,
    )
  print(f"\nplots: {save_heatmaps(results, names, args.out)}; numbers: {args.out / 'results.json'}")


if __name__ == "__main__":
  main()
