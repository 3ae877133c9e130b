"""OGD's step against the directions it stores: blocked basis against one block.

``cl_optax.ogd`` keeps its basis in blocks of ``block_size`` rows, reads a
block only once it holds a direction, and computes both products of a block
(``c = B_j g``, then ``g - B_jᵀ c``) one after the other. This times ``update``
(updates out, the state not copied) at several fills of one capacity, for
blocks of each size in ``--block-sizes`` and for one block of the whole
capacity (every row read at every fill), on the
``pmnist-gpm`` MLP (784-100-100-10 without biases, 89 400 parameters; the
capacity is that protocol's 1800 directions, 0.64 GB in float32). The floor is
the filled rows read once at the bandwidth of a jitted ``jnp.sum`` over the
whole buffer, measured in the same run: a block that stays in the cache
between its two products is read from memory once; a larger one twice.

  python -m benchmarks.ogd_blocks --fills 0,200,900,1800 --block-sizes 200,50 --repeats 7
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import cl_optax
from benchmarks.estimators import timed

SHAPES = {"layer0": (784, 100), "layer1": (100, 100), "head": (100, 10)}


def filled(state, count: int, seed: int = 0):
  """``state`` with random rows in every block and ``basis_count = count``."""
  rng = np.random.default_rng(seed)

  def rows(x):
    return jnp.asarray(rng.standard_normal(x.shape, np.float32) * 1e-3)

  basis = tuple(jax.tree.map(rows, block) for block in state.basis)
  return state._replace(basis=basis, basis_count=jnp.asarray(count, jnp.int32))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--capacity", type=int, default=1800)
  parser.add_argument("--fills", default="0,200,900,1800")
  parser.add_argument("--block-sizes", default="200,50")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  fills = [int(f) for f in args.fills.split(",")]
  sizes = [int(b) for b in args.block_sizes.split(",")]
  params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  row_bytes = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
  whole = jnp.ones((args.capacity, row_bytes // 4), jnp.float32)
  read_s = timed(functools.partial(jax.jit(jnp.sum), whole), args.repeats)
  bandwidth = whole.nbytes / read_s
  del whole
  platform = jax.devices()[0].platform
  print(f"JAX {jax.__version__} on {platform}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
  heads = [f"blocks of {b}: ms" for b in sizes]
  print("| fill | " + " | ".join(heads) + " | one block: ms | floor: ms | best / floor |")
  print("|---" * (len(sizes) + 4) + "|")
  for count in fills:
    times = []
    for block_size in (*sizes, args.capacity):
      tx = cl_optax.ogd(args.capacity, block_size=block_size)
      state = filled(tx.init(params), count)
      update = jax.jit(lambda g, s, tx=tx: tx.update(g, s)[0])
      times.append(1e3 * timed(functools.partial(update, grads, state), args.repeats))
      del state
    floor = 1e3 * count * row_bytes / bandwidth
    ratio = f"{min(times[:-1]) / floor:.2f}" if floor else "—"
    cells = " | ".join(f"{t:.1f}" for t in times)
    print(f"| {count} | {cells} | {floor:.1f} | {ratio} |")


if __name__ == "__main__":
  main()
