"""What each importance estimator costs on the Transformer LM, against one training epoch.

Every estimator runs over one task's data (``--sequences`` windows of 128
bytes + 1, in batches of ``--batch``) on the NNX byte LM of ``lm.py`` at
about 10 M parameters; the reference is one training epoch over the same
data: one jitted step per batch (forward + backward + Adam +
``apply_updates``). Each is timed after a first, compiling call (min of
``--repeats`` calls); ``ratio`` = estimator time / epoch time.

What each estimator computes here (the LM as a classifier for the ones that
need one: the window's bytes in, the next byte out, read at the last position):

  spg          ``importance.spg`` at task t (t + 1 heads: the LM's one head
               read t + 1 times, CE on the current head, summed logits on the
               others): t + 1 backward passes over the data; goal (t + 1)x
  fisher_diag  empirical Fisher, per-example gradients (``jax.vmap``)
  kfac_factors sampled-label K-FAC factors of every FFN dense layer and the
               output layer (taps at the last position)
  mas          per-example gradients of the squared norm of all logits
  das_units    gate gradients of the LM loss (``loss=`` callable)

  python -m benchmarks.estimators                        # lm-10m, 64 sequences
  python -m benchmarks.estimators --model lm --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import optax
from flax import nnx

import cl_optax
from benchmarks import lm
from benchmarks.lm_model import ByteLM


def timed(fn, repeats: int) -> float:
  """Min over ``repeats`` timed calls of ``fn`` after one compiling call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _model(name: str):
  """The LM's graph, its params (plain dict) and a merge function."""
  model = ByteLM(lm.lm_config(name), nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)

  def merge(p):
    s = nnx.State(state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s)

  return model, params, merge


class _Tap:
  """A dense layer that adds ``tap`` at the last position and records that input."""

  def __init__(self, layer, tap, inputs, name):
    self.layer, self.tap, self.inputs, self.name = layer, tap, inputs, name

  def __call__(self, x):
    self.inputs[self.name] = x[:, -1]
    return self.layer(x).at[:, -1].add(self.tap)


def kfac_layers(n_layers: int) -> list[str]:
  dense = [f"blocks/{i}/{d}" for i in range(n_layers) for d in ("ffn_in", "ffn_out")]
  return dense + ["lm_head"]


def estimators(name: str, params, merge, data, batch: int, task: int):
  """``{estimator: thunk}`` over ``data`` [n, T + 1] in batches of ``batch``."""
  n_layers = lm.lm_config(name)["layers"]
  xs = data[:, :-1].reshape(-1, batch, data.shape[1] - 1)
  ys = data[:, -1].reshape(-1, batch)
  stacked = cl_optax.importance.Batches(xs, ys)
  key = jax.random.key(1)

  def last_logits(p, x, head=0):
    del head  # one LM head, read once per SPG head
    return merge(p)(x)[:, -1]

  def all_logits(p, x):
    return merge(p)(x)

  layers = kfac_layers(n_layers)

  def tapped(p, x, taps):
    model, inputs = merge(p), {}
    for path in layers:
      *parent, leaf = path.split("/")
      owner = model
      for k in parent:
        owner = owner[int(k)] if k.isdigit() else getattr(owner, k)
      setattr(owner, leaf, _Tap(getattr(owner, leaf), taps[path], inputs, path))
    return model(x)[:, -1], inputs

  def gated_logits(p, gates, b, key):
    del key  # dropout 0 in the benchmark configs
    return merge(p)(b[:, :-1], gates)

  def lm_loss(logits, b):
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

  gates = merge(params).ones_gates()
  batches = cl_optax.importance.Batches(data.reshape(-1, batch, data.shape[1]))
  return {
    f"spg (task {task}: {task + 1} heads)": lambda: cl_optax.importance.spg(
      last_logits, params, stacked, task=task
    ),
    "fisher_diag (empirical)": lambda: cl_optax.importance.fisher_diag(
      last_logits, params, stacked
    ),
    "kfac_factors (sampled)": lambda: cl_optax.importance.kfac_factors(
      tapped, params, stacked, layers=layers, key=key
    ),
    "mas": lambda: cl_optax.importance.mas_sensitivity(all_logits, params, stacked),
    "das_units (LM loss)": lambda: cl_optax.importance.das_units(
      gated_logits, params, gates, batches, key=key, loss=lm_loss, stacked=True
    ),
  }


def epoch_thunk(name: str, params, data, batch: int):
  """One training epoch (Adam) over ``data``: a jitted step per batch."""
  loss = lm.lm_loss(name)
  tx = optax.adam(1e-3)
  batches = list(data.reshape(-1, batch, data.shape[1]))

  @jax.jit
  def step(p, s, b):
    g = jax.grad(loss)(p, b)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def run():
    p, s = params, tx.init(params)
    for b in batches:
      p, s = step(p, s, b)
    return p

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="lm-10m", choices=sorted(lm.CONFIGS))
  parser.add_argument("--sequences", type=int, default=64, help="one task's data")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--task", type=int, default=2, help="SPG's task index (t + 1 heads)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--only", default="", help="comma list of estimator name prefixes")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args()

  _, params, merge = _model(args.model)
  length = lm.lm_config(args.model)["length"]
  data = lm.lm_batch(args.sequences, length, seed=0)
  n = lm.n_params(params)
  print(f"{args.model}: {n / 1e6:.2f} M parameters, {args.sequences} sequences x {length} bytes, "
        f"batch {args.batch}; JAX {jax.__version__} on {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()})", flush=True)  # fmt: skip
  epoch = timed(epoch_thunk(args.model, params, data, args.batch), args.repeats)
  print(f"  one training epoch (Adam): {epoch:.2f} s", flush=True)
  rows = [{"estimator": "epoch", "seconds": epoch, "ratio": 1.0}]
  only = [o for o in args.only.split(",") if o]
  for label, thunk in estimators(args.model, params, merge, data, args.batch, args.task).items():
    if only and not any(label.startswith(o) for o in only):
      continue
    t = timed(thunk, args.repeats)
    rows.append({"estimator": label, "seconds": t, "ratio": t / epoch})
    print(f"  {label:32s} {t:8.2f} s  {t / epoch:5.2f}x epoch", flush=True)
  if args.json:
    meta = {"model": args.model, "params": n, "sequences": args.sequences, "batch": args.batch}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
