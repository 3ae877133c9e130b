"""GEM's optimiser part: the Gram matrix (k^2 P multiply-adds) vs the QP solver.

python -c "from benchmarks import gem_parts; print(gem_parts.gem_parts('lm-10m', 20))"
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import overhead_cases
from benchmarks.floor import params_for
from cl_optax.projection import solve_box_qp


def gem_qp(gram, dots, mask, active, strength: float = 0.5, eps: float = 1e-3):
  """``(v, active)``: GEM's dual QP as ``cl_optax.gem`` poses it (Gram matrix of the masked
  rows + ``eps I``, lower bounds ``strength``), solved by the public ``solve_box_qp``."""
  both = mask[:, None] & mask[None, :]
  P = jnp.where(both, 0.5 * (gram + gram.T), 0.0) + jnp.diag(jnp.where(mask, eps, 1.0))
  lower = jnp.where(mask, strength, 0.0)
  c = jnp.where(mask, dots, 0.0)
  return solve_box_qp(P, c, lower, active=active | ~mask, return_active=True)


def gem_parts(model: str = "lm-10m", k: int = 20, repeats: int = 5, calls: int = 3) -> dict:
  """GEM's optimiser part at ``k`` tasks: the whole update (+ sgd apply) vs its pieces.

  gram: ``G G^T`` and ``G g`` (k^2 P and k P multiply-adds, memory-bound on G);
  qp: ``solve_box_qp`` on that Gram matrix alone; the QP's share is qp / update.
  """
  import cl_optax

  params = params_for(model, jnp.float32)
  extra = overhead_cases.gem_extra(k)(params)
  tx = optax.chain(cl_optax.gem(max_tasks=k), optax.sgd(0.1))
  grads = overhead_cases.uniform_like(params, seed=2)

  @functools.partial(jax.jit, donate_argnums=0)
  def update(p, s, g, e):
    u, s = tx.update(g, s, p, **e)
    return optax.apply_updates(p, u), s

  @jax.jit
  def gram(g, e):
    pairs = list(zip(jax.tree.leaves(g), jax.tree.leaves(e["task_grads"])))
    gr = sum(jnp.tensordot(t, t, (list(range(1, t.ndim)),) * 2) for _, t in pairs)
    dots = sum(jnp.tensordot(t, u, (list(range(1, t.ndim)), list(range(u.ndim)))) for u, t in pairs)
    return gr, dots

  gr, dots = gram(grads, extra)
  mask = extra["task_mask"]
  qp = jax.jit(lambda gr, d, a: gem_qp(gr, d, mask, a))
  solved = qp(gr, dots, jnp.ones((k,), bool))[1]
  state = tx.init(params)
  p = jax.tree.map(jnp.copy, params)
  runs = {
    "update": lambda: update(p, state, grads, extra),
    "gram": lambda: gram(grads, extra),
    "qp_cold": lambda: qp(gr, dots, jnp.ones((k,), bool)),
    "qp_warm": lambda: qp(gr, dots, solved),
  }

  times = {n: [] for n in runs}
  for _ in range(repeats):
    for n, f in runs.items():
      out = f()
      jax.block_until_ready(out)
      if n == "update":
        p = out[0]
      start = time.perf_counter()
      for _ in range(calls):
        out = f()
        if n == "update":
          p = out[0]
      jax.block_until_ready(out)
      times[n].append((time.perf_counter() - start) / calls)
  t = {n: min(v) for n, v in times.items()}
  t["qp"] = t["qp_cold"]
  return {
    "model": model,
    "k": k,
    "n_params": sum(x.size for x in jax.tree.leaves(params)),
    **{f"{n}_ms": 1e3 * v for n, v in t.items()},
    "qp_share": t["qp"] / t["update"],
  }
