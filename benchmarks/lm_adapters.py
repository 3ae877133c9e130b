"""Continual pre-training with adapters: full FT, DAS, LoRA, O-LoRA, InfLoRA, LoRA + replay, joint.

A byte-level causal Transformer LM (:mod:`benchmarks.lm_adapters_model`: the
``ByteLM`` of ``examples/continual_pretraining.py`` with LoRA branches on every
block's q and v, 1.02 M base parameters at the default size) is pre-trained on
the general corpus of that example (standard-library text, no downloads), then
trained on its four domains in turn. Rows:

  adam         full fine-tuning with Adam (every base parameter)
  das          Adam + DAS soft-masking (as the example: proxy KL, then own loss)
  lora         sequential LoRA: one adapter per domain, no constraint (olora, lambda1 = 0)
  olora        O-LoRA (cl_optax.olora, L1 orthogonality, lambda1 = 0.5)
  inflora      InfLoRA (cl_optax.inflora, eps 0.95 -> 1.0, only lora_b trained)
  lora_replay  sequential LoRA, a quarter of each batch general-corpus windows
  joint        Adam on all domains at once (the multi-domain upper bound)

Reported per method: the held-out loss matrix (nats per byte; row = after
which stage, column = which corpus), the final average loss, the forgetting of
the domains and of the general corpus, trainable parameters, optimiser-state
bytes and training tokens/s relative to full fine-tuning in the same run.

  python -m benchmarks.lm_adapters --seeds 3 --out benchmarks/figures/lm_adapters
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cl_optax
from benchmarks.lm_adapters_model import AdaptedLM, make_apply, split_model
from benchmarks.lm_adapters_report import merge, report
from cl_optax.importance import Batches, das_param_importance, das_units
from examples.continual_pretraining import (
  DOMAINS,
  GENERAL,
  das_units_spec,
  load_corpus,
  split,
  windows,
)

METHODS = ("adam", "das", "lora", "olora", "inflora", "lora_replay", "joint")
LORA = ("lora", "olora", "inflora", "lora_replay")


def xent(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


class Ctx:
  """The model's pieces, the data and the jitted functions shared by every method."""

  def __init__(self, cfg, data, held_out):
    self.cfg, self.data, self.held_out = cfg, data, held_out
    model = AdaptedLM(cfg, nnx.Rngs(0))
    self.graphdef, _, _, self.templates = split_model(model)
    self.ones_gates = model.ones_gates()
    self.apply, self.hidden = make_apply(self.graphdef, self.templates)
    self.eval = jax.jit(
      lambda b, lo, w: jnp.mean(jax.vmap(lambda x: xent(self.apply(b, lo, x[:, :-1]), x))(w))
    )
    self.inputs = jax.jit(lambda b, lo, x: self.apply(b, lo, x[:, :-1], capture=True)[1])

  def evaluate(self, base, lora):
    return [float(self.eval(base, lora, w)) for w in self.held_out]

  def batch(self, data, rng):
    return windows(data, self.cfg["batch"], self.cfg["length"], rng)

  def covariances(self, base, lora, data, rng):
    """InfLoRA's signal: per block, the covariance of the attention input (q and v share it)."""
    acc = None
    for _ in range(self.cfg["cov_batches"]):
      xs = self.inputs(base, lora, self.batch(data, rng))
      covs = [cl_optax.adapters.input_covariance(h) for h in xs]
      acc = covs if acc is None else [a + c for a, c in zip(acc, covs)]
    acc = [a / self.cfg["cov_batches"] for a in acc]
    return {f"blocks/{i}/lora_{p}": c for i, c in enumerate(acc) for p in ("q", "v")}


def make_step(ctx, tx, train_base: bool):
  def step(base, lora, state, batch):
    def loss(p):
      return xent(
        ctx.apply(p, lora, batch[:, :-1]) if train_base else ctx.apply(base, p, batch[:, :-1]),
        batch,
      )

    p = base if train_base else lora
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
    return (p, lora, state) if train_base else (base, p, state)

  return jax.jit(step)


def pretrain(ctx, seed):
  model = AdaptedLM(ctx.cfg, nnx.Rngs(seed))
  _, base, lora, _ = split_model(model)
  tx = optax.adam(ctx.cfg["lr"])
  step, state = make_step(ctx, tx, True), tx.init(base)
  rng = np.random.default_rng(seed)
  for _ in range(ctx.cfg["pretrain_steps"]):
    base, lora, state = step(base, lora, state, ctx.batch(ctx.data[0], rng))
  return base, lora


def make_tx(method, ctx, base):
  cfg = ctx.cfg
  if method == "inflora":
    return cl_optax.inflora(optax.adam(cfg["lora_lr"]), cfg["eps_begin"], 1.0)
  if method in LORA:
    lam = cfg["olora_lambda"] if method == "olora" else 0.0
    return cl_optax.olora(optax.adam(cfg["lora_lr"]), orthogonality=lam, seed=cfg["seed"])
  if method == "das":
    zero = jax.tree.map(jnp.zeros_like, ctx.ones_gates)
    shapes = das_param_importance(base, das_units_spec_dict(ctx, zero))
    return optax.chain(optax.adam(cfg["lr"]), cl_optax.soft_mask(importance_shapes=shapes))
  return optax.adam(cfg["lr"])


def das_units_spec_dict(ctx, gate_imp):
  class _M:  # das_units_spec reads .layers only
    layers = ctx.cfg["layers"]

  return das_units_spec(_M(), gate_imp)  # type: ignore[arg-type]


def das_importance(ctx, base, lora, data, loss, key, rng):
  cfg = ctx.cfg
  xs = jnp.stack([ctx.batch(data, rng) for _ in range(cfg["impt_batches"])])
  if loss == "proxy_kl":
    fn = lambda p, g, b, k: ctx.hidden(p, lora, b[:, :-1], g, k)  # noqa: E731
  else:
    fn = lambda p, g, b, k: ctx.apply(p, lora, b[:, :-1], g, k)  # noqa: E731
    loss = lambda logits, b: xent(logits, b)  # noqa: E731
  gates = das_units(fn, base, ctx.ones_gates, Batches(xs), key=key, loss=loss, stacked=True)
  return das_param_importance(base, das_units_spec_dict(ctx, gates))


def run_stream(method, ctx, pretrained, seed):
  """Trains ``method`` over the domains; returns (loss matrix, trainable, state bytes, tokens/s)."""
  cfg, domains = ctx.cfg, ctx.data[1:]
  base, lora = jax.tree.map(jnp.copy, pretrained)
  rows = [ctx.evaluate(base, lora)]
  train_base = method not in LORA
  tx = make_tx(method, ctx, base)
  state = tx.init(base if train_base else lora)
  step = make_step(ctx, tx, train_base)
  rng, cov_rng = np.random.default_rng(seed + 1), np.random.default_rng(seed + 3)
  key, impt_rng = jax.random.key(seed + 1), np.random.default_rng(seed + 2)
  tokens, seconds = 0, 0.0
  if method == "joint":
    domains = [np.concatenate(domains)]
  if method == "inflora":
    state = cl_optax.consolidate(
      state, lora, next_covariance=ctx.covariances(base, lora, domains[0], cov_rng)
    )
    lora, state = cl_optax.apply_pending_writes(lora, state)
  for t, data in enumerate(domains):
    if method == "das" and t == 0:
      imp = das_importance(ctx, base, lora, data, "proxy_kl", jax.random.fold_in(key, 0), impt_rng)
      state = cl_optax.consolidate(state, base, importance=imp)
    n_steps = cfg["steps"] * (len(ctx.data) - 1 if method == "joint" else 1)
    for s in range(n_steps):
      batch = ctx.batch(data, rng)
      if method == "lora_replay":
        n = cfg["batch"] // 4
        batch[:n] = windows(ctx.data[0], n, cfg["length"], rng)
      start = time.perf_counter()
      base, lora, state = step(base, lora, state, batch)
      if s > 0:  # the first step compiles
        jax.block_until_ready(lora)
        seconds += time.perf_counter() - start
        tokens += batch.size - len(batch)
    rows.append(ctx.evaluate(base, lora))
    if t + 1 == len(domains):
      break
    if method == "das":
      imp = das_importance(ctx, base, lora, data, "own", jax.random.fold_in(key, t + 1), impt_rng)
      state = cl_optax.consolidate(state, base, importance=imp)
    elif method == "inflora":
      cov = ctx.covariances(base, lora, data, cov_rng)
      nxt = ctx.covariances(base, lora, domains[t + 1], cov_rng)
      state = cl_optax.consolidate(state, lora, covariance=cov, next_covariance=nxt)
    elif method in LORA:
      state = cl_optax.consolidate(state, lora)
    if method in LORA:
      lora, state = cl_optax.apply_pending_writes(lora, state)
  trained = base if train_base else lora
  if method in LORA:  # the current adapter only: lora_a and lora_b (InfLoRA: lora_b)
    roles = ("lora_b",) if method == "inflora" else ("lora_a", "lora_b")
    leaves = jax.tree_util.tree_leaves_with_path(trained)
    n_train = sum(x.size for p, x in leaves if jax.tree_util.keystr(p[-1:]).strip("[]'") in roles)
  else:
    n_train = sum(x.size for x in jax.tree.leaves(trained))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  return np.array(rows), int(n_train), int(state_bytes), tokens / max(seconds, 1e-9)


def step_cost(ctx, repeats: int) -> dict:
  """Seconds per jitted adapter train step: plain LoRA (Adam on lora_a, lora_b), O-LoRA, InfLoRA."""
  _, base, lora, _ = split_model(AdaptedLM(ctx.cfg, nnx.Rngs(0)))
  labels = jax.tree_util.tree_map_with_path(
    lambda p, _: "train" if str(p[-1]) in ("['lora_a']", "['lora_b']") else "frozen", lora
  )
  plain = optax.multi_transform(
    {"train": optax.adam(ctx.cfg["lora_lr"]), "frozen": optax.set_to_zero()}, labels
  )
  txs = {"lora": plain, "olora": make_tx("olora", ctx, base)}
  txs["inflora"] = make_tx("inflora", ctx, base)
  runs = {n: [make_step(ctx, tx, False), base, lora, tx.init(lora)] for n, tx in txs.items()}
  batch = ctx.batch(ctx.data[1], np.random.default_rng(0))
  out = {n: float("inf") for n in runs}
  for r in range(repeats + 1):  # interleaved, the minimum of each (repeat 0 compiles)
    for n, (step, *args) in runs.items():
      start = time.perf_counter()
      runs[n][1:] = jax.block_until_ready(step(*args, batch))
      if r:
        out[n] = min(out[n], time.perf_counter() - start)
  for name, s in out.items():
    print(f"{name:8s} {1e3 * s:8.2f} ms/step  {s / out['lora']:.2f}x plain LoRA", flush=True)
  return out


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  arg = parser.add_argument
  arg("--methods", default=",".join(METHODS))
  arg("--seeds", type=int, default=3)
  arg("--domains", type=int, default=len(DOMAINS))
  for name, default in [("d", 160), ("layers", 3), ("heads", 4), ("ff", 640), ("length", 64)]:
    arg(f"--{name}", type=int, default=default)
  for name, default in [("batch", 16), ("pretrain-steps", 300), ("steps", 80), ("rank", 8)]:
    arg(f"--{name}", type=int, default=default)
  for name, default in [("impt-batches", 4), ("cov-batches", 4), ("eval-windows", 32)]:
    arg(f"--{name}", type=int, default=default)
  arg("--max-bytes", type=int, default=400_000)
  for name, default in [("lr", 1e-3), ("lora-lr", 2e-3), ("alpha", 16.0), ("dropout", 0.1)]:
    arg(f"--{name}", type=float, default=default)
  arg("--olora-lambda", type=float, default=0.5)
  arg("--eps-begin", type=float, default=0.95)
  arg("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
  arg("--merge", nargs="*", type=pathlib.Path, help="only merge these runs' results.json")
  arg("--cost", type=int, default=0, help="only time N adapter steps of each kind")
  arg("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/figures/lm_adapters"))
  return parser.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  if args.merge:
    return merge(args.merge, args.out)
  cfg = {k: v for k, v in vars(args).items() if k not in ("out", "methods", "merge")}
  cfg |= {"slots": args.domains, "seed": 0}
  corpora = [GENERAL, *DOMAINS[: args.domains]]
  names = [c[0] for c in corpora]
  data = [split(load_corpus(pk, kind, args.max_bytes)) for _, pk, kind in corpora]
  eval_rng = np.random.default_rng(1234)
  held_out = [
    windows(te, args.eval_windows, args.length, eval_rng).reshape(-1, 16, args.length + 1)
    for _, te in data
  ]
  ctx = Ctx(cfg, [tr for tr, _ in data], held_out)
  if args.cost:
    return step_cost(ctx, args.cost)
  methods = args.methods.split(",")
  results = {m: [] for m in methods}
  start = time.perf_counter()
  for seed in range(args.first_seed, args.first_seed + args.seeds):
    ctx.cfg["seed"] = seed
    pretrained = pretrain(ctx, seed)
    print(f"seed {seed}: pre-trained ({time.perf_counter() - start:.0f} s)", flush=True)
    for m in methods:
      results[m].append(run_stream(m, ctx, pretrained, seed))
      print(f"seed {seed} {m}: final row {np.round(results[m][-1][0][-1], 3)} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
  n_base = sum(x.size for x in jax.tree.leaves(pretrained[0]))
  return report(results, names, cfg, n_base, time.perf_counter() - start, args.out)


if __name__ == "__main__":
  main()
