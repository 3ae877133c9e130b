"""The memory-traffic floor of each element-wise transform, and what XLA compiles.

An element-wise transform's update (``update`` + ``apply_updates``, params
and state donated) on a large model is bound by memory traffic: its floor is
the bytes of the params-sized arrays it must read and write over the copy
bandwidth, measured in the same run by a jitted fused ``a * x + y`` (two
reads, one write) over as many bytes. ``TRAFFIC`` says, one line per
transform, which arrays those are and in which dtype.

  python -m benchmarks.floor --model lm-100m            # times vs floor
  python -m benchmarks.floor --model lm-10m --hlo si    # + the compiled kernels of si

``--hlo`` prints each compiled kernel (fusion, copy, ...) of the entry
computation that touches a params-sized array, with the bytes it reads and
writes: a transform above its floor shows the extra pass here.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import lm, overhead_cases
from benchmarks.hlo_kernels import compiled_bytes, print_kernels

# Params-sized arrays each update reads and writes, "name:dtype"; dtype P is the
# parameters' dtype. "base" expands to the base optimiser's line. g = the
# incoming gradient, p = params (read, then written by apply_updates).
BASE_TRAFFIC = {
  "sgd": ("g:P p:P", "p:P"),
  "sgdm": ("g:P p:P trace:P", "p:P trace:P"),
  "adam": ("g:P p:P mu:P nu:P", "p:P mu:P nu:P"),
}
TRAFFIC = {
  "soft_mask": ("base importance:f32", "base"),
  "soft_mask_bf16": ("base importance:bf16", "base"),
  "freeze": ("base frozen:bool", "base"),
  "soft_mask_units": ("base", "base"),  # per-unit importance: a vector per leaf
  "ewc": ("base anchor:f32 fisher:f32", "base"),
  "ewc_bf16": ("base anchor:f32 fisher:bf16", "base"),
  "online_ewc": ("base anchor:f32 fisher:f32", "base"),
  "mas": ("base anchor:f32 importance:f32", "base"),
  # SI: the penalty reads anchor and importance; the path integral reads and
  # rewrites s = omega + g_t (theta_t - anchor) and the recorded gradient g_t
  "si": ("base anchor:f32 importance:f32 s:f32 prev_g:f32", "base s:f32 prev_g:f32"),
  # NCL diag with radius=None: one pass, reads mean and precision
  "ncl_diag": ("base mean:f32 precision:f32", "base"),
  # A-GEM: a first pass reads g and r for the two dot products, the second
  # reads g, r (and p) to project and apply
  "agem": ("base g:P r:f32 r:f32", "base"),
  # L2 Init reads its float32 anchor; param_noise draws the noise (no array read)
  "l2_init": ("base anchor:f32", "base"),
  "param_noise": ("base", "base"),
}
_SIZES = {"P": None, "f32": 4, "bf16": 2, "bool": 1}


def traffic(case: str, base: str, param_bytes: int) -> tuple[float, list[str], list[str]]:
  """(bytes per parameter, reads, writes) of ``case``'s update."""
  reads, writes = TRAFFIC.get(case, ("base", "base")) if case != base else ("base", "base")

  def expand(line, which):
    out = []
    for tok in line.split():
      out += BASE_TRAFFIC[base][which].split() if tok == "base" else [tok]
    return out

  reads, writes = expand(reads, 0), expand(writes, 1)
  size = lambda tok: _SIZES[tok.split(":")[1]] or param_bytes  # noqa: E731
  return sum(size(t) for t in reads + writes), reads, writes


def copy_bandwidth(n: int, repeats: int = 5) -> float:
  """Bytes/s of a jitted, fused ``a * x + y`` over float32 arrays of ``n`` (12 n bytes)."""
  x = jnp.ones((n,), jnp.float32)
  y = jnp.ones((n,), jnp.float32)
  axpy = jax.jit(lambda a, x, y: a * x + y, donate_argnums=2)
  y = axpy(0.5, x, y).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    y = axpy(0.5, x, y).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 12 * n / best


def matmul_rate(m: int, k: int, n: int, repeats: int = 5, calls: int = 10) -> float:
  """FLOP/s of a jitted float32 ``[m, k] @ [k, n]`` (2 m k n FLOPs), min over repeats."""
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = dot(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2 * m * k * n / best


# ------------------------------------------------------------------ times
def params_for(model: str, dtype):
  if model in lm.CONFIGS:
    return lm.lm_params(model, dtype)
  return jax.tree.map(lambda p: p.astype(dtype), overhead_cases.model_params(model))


def _timer(tx, params, make_state, grads, extra, calls):
  """Times ``calls`` chained ``update`` + ``apply_updates`` (params and state donated).

  The gradient is an argument (a constant would be folded into the executable).
  Each run copies params and the prepared state and drops them after, so that
  only one case's working buffers are alive at a time (10^8 parameters on a
  shared machine).
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g, e):
    updates, s = tx.update(g, s, p, **e)
    return optax.apply_updates(p, updates), s

  compiled = step.lower(params, jax.eval_shape(make_state), grads, extra).compile()
  prepared = make_state()  # built once (random importances are slow at 10^8), copied per run

  def run():
    p, s = compiled(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, prepared), grads, extra)
    jax.block_until_ready((p, s))
    start = time.perf_counter()
    for _ in range(calls):
      p, s = compiled(p, s, grads, extra)
    jax.block_until_ready((p, s))
    elapsed = (time.perf_counter() - start) / calls
    del p, s
    return elapsed

  run.hlo = compiled.as_text()
  return run


def _axpy_timer(n, calls):
  axpy = jax.jit(lambda a, x, y: a * x + y, donate_argnums=2)

  def run():
    x, y = jnp.ones((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    y = axpy(0.5, x, y).block_until_ready()
    start = time.perf_counter()
    for _ in range(calls):
      y = axpy(0.5, x, y)
    y.block_until_ready()
    elapsed = (time.perf_counter() - start) / calls
    del x, y
    return elapsed

  return run


def measure(case, params, repeats, calls):
  """Base, transform and ``a * x + y`` timed interleaved; the floor from the bandwidth."""
  base = overhead_cases.BASES[case.base]()
  tx = case.make(overhead_cases.BASES[case.base]())
  extra = case.extra_args(params)
  grads = overhead_cases.uniform_like(params, seed=2)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  n = sum(p.size for p in jax.tree.leaves(params))
  make_state = lambda: case.prepare(tx.init(params), params)  # noqa: E731
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(make_state)))
  timers = {
    "base": _timer(base, params, lambda: base.init(params), grads, extra, calls),
    "tx": _timer(tx, params, make_state, grads, extra, calls),
    "axpy": _axpy_timer(n, calls),
  }
  times = {k: [] for k in timers}
  for _ in range(repeats):  # interleaved: drifts in machine load hit all three
    for k, run in timers.items():
      times[k].append(run())
  t = {k: min(v) for k, v in times.items()}
  bw = 12 * n / t["axpy"]
  pbytes = jax.tree.leaves(params)[0].dtype.itemsize
  fb, reads, writes = traffic(case.name, case.base, pbytes)
  bb, _, _ = traffic(case.base, case.base, pbytes)
  return {
    "case": case.name,
    "base": case.base,
    "n_params": n,
    "bandwidth": bw,
    "base_s": t["base"],
    "update_s": t["tx"],
    "ratio": t["tx"] / t["base"],
    "floor_bytes": fb * n,
    "base_floor_bytes": bb * n,
    "achieved_floor": t["tx"] / (fb * n / bw),
    "base_achieved_floor": t["base"] / (bb * n / bw),
    "floor_ratio": fb / bb,
    "reads": reads,
    "writes": writes,
    "state_bytes": state_bytes,
    "compiled_bytes_per_param": compiled_bytes(timers["tx"].hlo, params),
    "base_compiled_bytes_per_param": compiled_bytes(timers["base"].hlo, params),
    "floor_bytes_per_param": fb,
    "base_floor_bytes_per_param": bb,
  }


ELEMENTWISE = [
  "soft_mask",
  "soft_mask_bf16",
  "freeze",
  "soft_mask_units",
  "ewc",
  "ewc_bf16",
  "online_ewc",
  "mas",
  "si",
  "ncl_diag",
  "agem",
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="lm-100m")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--cases", default=",".join(ELEMENTWISE))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--hlo", default="", help="cases whose compiled kernels to print")
  parser.add_argument("--no-time", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument(
    "--matmul", action="store_true", help="only the float32 matmul rate (square and MLP shapes)"
  )
  args = parser.parse_args()
  if args.matmul:
    for shape in [(2048, 2048, 2048), (266, 784, 256), (266, 256, 256)]:
      print(f"matmul {shape}: {matmul_rate(*shape) / 1e9:.1f} GFLOP/s", flush=True)
    return
  dtype = jnp.dtype(args.dtype)
  params = params_for(args.model, dtype)
  n = sum(p.size for p in jax.tree.leaves(params))
  print(
    f"{args.model} {args.dtype}: {n / 1e6:.1f} M parameters; floor = traffic / bandwidth of "
    f"a*x+y over {12 * n / 1e9:.2f} GB, timed interleaved with each case"
  )
  by_name = {c.name: c for c in overhead_cases.CASES}
  for name in [c for c in args.hlo.split(",") if c]:
    case = by_name[name]
    base = overhead_cases.BASES[case.base]()
    tx = case.make(overhead_cases.BASES[case.base]())
    print_kernels(base, params, base.init(params), {}, case.base)
    print_kernels(tx, params, case.prepare(tx.init(params), params), case.extra_args(params), name)
  if args.no_time:
    return
  print(
    f"{'case':<16}{'base':<6}{'GB/s':>6}{'base ms':>9}{'ms':>9}{'x base':>8}{'floor x':>9}"
    f"{'base/floor':>11}{'ach/floor':>10}  compiled B/param (floor): base, case"
  )
  rows = []
  for name in args.cases.split(","):
    r = measure(by_name[name], params, args.repeats, args.calls)
    print(
      f"{name:<16}{r['base']:<6}{r['bandwidth'] / 1e9:>6.2f}{1e3 * r['base_s']:>9.1f}"
      f"{1e3 * r['update_s']:>9.1f}{r['ratio']:>8.2f}{r['floor_ratio']:>9.2f}"
      f"{r['base_achieved_floor']:>11.2f}{r['achieved_floor']:>10.2f}  "
      f"{r['base_compiled_bytes_per_param']:.0f} ({r['base_floor_bytes_per_param']:.0f}), "
      f"{r['compiled_bytes_per_param']:.0f} ({r['floor_bytes_per_param']:.0f})",
      flush=True,
    )
    rows.append(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
