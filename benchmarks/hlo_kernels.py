"""What XLA compiled for an update: the entry kernels that touch params-sized arrays.

:func:`entry_kernels` reads the bytes each kernel (fusion, copy, ...) of a compiled
module's entry computation reads and writes; ``python -m benchmarks.floor --hlo``
prints them per transform (:func:`print_kernels`).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import optax

_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s8|u8|pred|s64)\[([\d,]*)\]")
_BYTES = {
  "f64": 8,
  "s64": 8,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "bf16": 2,
  "f16": 2,
  "s8": 1,
  "u8": 1,
  "pred": 1,
}


def _arrays(text: str, min_elems: int) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    if n >= min_elems:
      total += n * _BYTES[dt]
  return total


def entry_kernels(hlo: str, min_elems: int) -> list[tuple[str, str, int, int]]:
  """(name, op, bytes read, bytes written) of every entry instruction touching big arrays."""
  entry = hlo[hlo.index("\nENTRY") :]
  sizes, rows = {}, []
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
    if not m:
      continue
    name, out, op, rest = m.groups()
    sizes[name] = _arrays(out, min_elems)
    if op in ("parameter", "tuple", "get-tuple-element", "constant", "bitcast"):
      continue
    args = rest.split(")")[0]
    r = sum(sizes.get(a.strip().lstrip("%"), 0) for a in args.split(","))
    if r or sizes[name]:
      kind = re.search(r"kind=(\w+)", line)
      rows.append((name, op + (f"/{kind.group(1)}" if kind else ""), r, sizes[name]))
  return rows


def update_hlo(tx, params, state, extra) -> str:
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g, e):
    updates, s = tx.update(g, s, p, **e)
    return optax.apply_updates(p, updates), s

  return step.lower(params, state, params, extra).compile().as_text()


def print_kernels(tx, params, state, extra, label: str) -> int:
  sizes = [p.size for p in jax.tree.leaves(params)]
  min_elems = sorted(sizes)[len(sizes) // 2]  # the median leaf and above
  rows = entry_kernels(update_hlo(tx, params, state, extra), min_elems)
  total = sum(r + w for _, _, r, w in rows)
  big = sum(p.size for p in jax.tree.leaves(params) if p.size >= min_elems)
  print(
    f"  {label}: {len(rows)} kernels on leaves >= {min_elems} elements, "
    f"{total / big:.2f} bytes per parameter (of those leaves)"
  )
  ops = {}
  for _, op, r, w in rows:
    n, rr, ww = ops.get(op, (0, 0, 0))
    ops[op] = (n + 1, rr + r, ww + w)
  for op, (n, r, w) in sorted(ops.items()):
    print(f"    {op:<22}{n:>4} x  read {r / big:6.2f}  write {w / big:6.2f}  bytes/param")
  return total


def compiled_bytes(hlo: str, params) -> float:
  """Bytes per parameter that the compiled update's kernels read and write (leaves >= median)."""
  sizes = [p.size for p in jax.tree.leaves(params)]
  min_elems = sorted(sizes)[len(sizes) // 2]
  big = sum(s for s in sizes if s >= min_elems)
  return sum(r + w for _, _, r, w in entry_kernels(hlo, min_elems)) / big
