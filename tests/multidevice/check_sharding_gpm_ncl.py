"""Run in its own process with 8 host devices (see tests/test_sharding_gpm_ncl.py).

``gpm`` (and ``sgp``, ``nscl``, ``trgp``) and ``ncl(precision="kfac")`` keep
matrices that are not shaped like any parameter: GPM a ``[d_in, d_in]``
orthogonal basis per kernel, NCL the Kronecker factors ``A [in+1, in+1]``,
``G [out, out]`` and their damped inverses. Both are built at ``consolidate``
by a decomposition (GPM: SVD and eigh of the task's representations; NCL: eigh
of each factor) that XLA does not partition, so these matrices are
*replicated* (one copy per device, and small: a layer's fan-in or fan-out
squared). What must hold:

* every state leaf shaped like a parameter (NCL's prior mean, its diagonal
  precision outside the layers) has that parameter's sharding;
* the replicated matrices are replicated (not placed on one device);
* the jitted update is matmuls of a replicated matrix with the sharded
  gradient: partial products reduced across devices (all-reduce), no
  all-gather of the sharded gradient, parameters or state (a Kronecker
  layer: with its kernel split over its output axis; split over its input
  axis, the layer's gradient is gathered along it, see SPECS);
* the updates keep the parameters' sharding and equal the single-device ones.
"""

import host_devices  # noqa: E402, F401  (sets XLA_FLAGS before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cl_optax  # noqa: E402

# GPM projects the input axis (rows) of a kernel split over both axes. A Kronecker
# layer's kernel is split over `model` on its output axis, as in
# examples/sharded_training.py: A^-1 mixes all input rows of the layer's gradient,
# so a kernel whose input axis is split has its *gradient* gathered along that
# axis (checked below: only kernel-shaped all-gathers, never a factor).
SPECS = {
  "gpm": {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "table": P(None, "data")},
  "sgp": {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "table": P(None, "data")},
  "nscl": {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "table": P(None, "data")},
  "trgp": {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "table": P(None, "data")},
  "ncl_kfac": {"dense": {"kernel": P(None, "model"), "bias": P("model")}, "table": P(None, "data")},
  "input_split": {"dense": {"kernel": P("data", None), "bias": P()}, "table": P(None, "data")},
}
SHAPES = {"dense": {"kernel": (16, 8), "bias": (8,)}, "table": (3, 32)}
is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa: E731


def values(seed):
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  return jax.tree.map(lambda s: jax.random.normal(next(keys), s), SHAPES, is_leaf=is_shape)


def signals(params):
  a = jax.random.normal(jax.random.key(7), (24, 17))
  g = jax.random.normal(jax.random.key(8), (24, 8))
  kron = cl_optax.importance.KronFactors(a=a.T @ a / 24, g=g.T @ g / 24)
  return {
    "gpm": {
      "representations": {
        "dense": {"kernel": jax.random.normal(jax.random.key(5), (12, 16))},
        "table": jax.random.normal(jax.random.key(6), (12, 3)),
      }
    },
    "nscl": {
      "representations": {
        "dense": {"kernel": jax.random.normal(jax.random.key(5), (12, 16))},
        "table": jax.random.normal(jax.random.key(6), (12, 3)),
      }
    },
    "trgp": {
      "representations": {
        "dense": {"kernel": jax.random.normal(jax.random.key(5), (12, 16))},
        "table": jax.random.normal(jax.random.key(6), (12, 3)),
      },
      "next_grads": values(9),
    },
    "ncl_kfac": {"precision": {"dense": kron, "table": jnp.square(params["table"])}},
    "sgp": {
      "representations": {
        "dense": {"kernel": jax.random.normal(jax.random.key(5), (12, 16))},
        "table": jax.random.normal(jax.random.key(6), (12, 3)),
      }
    },
  }


TRANSFORMS = {
  "gpm": lambda: cl_optax.gpm(0.9),
  "sgp": lambda: cl_optax.sgp(0.9, alpha=3.0),  # GPM's bases, replicated, with importances
  "nscl": lambda: cl_optax.nscl(10.0),  # covariance and eigenvectors, replicated
  "trgp": lambda: cl_optax.trgp(0.9, max_tasks=3),  # GPM's basis and the per-task bases
  "ncl_kfac": lambda: cl_optax.ncl(
    10.0, strength=0.5, damping=0.1, radius=0.3, precision="kfac", layers=("dense",)
  ),
}


def replicated(x):
  """A full copy: replicated over the mesh, or (built outside jit) on one device,
  from where jit copies it to every device of the update."""
  return x.is_fully_replicated


def run(name, params, mesh, *, gathers=False):
  tx = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
  state = tx.init(params)
  for task in range(2):
    state = cl_optax.consolidate(state, params, **signals(params)[name])
    if mesh is not None:
      check_state(name, state, params, mesh, task)
  update = jax.jit(tx.update)
  grads = values(3)
  if mesh is not None:
    grads = jax.tree.map(jax.device_put, grads, jax.tree.map(lambda p: p.sharding, params))
    hlo = update.lower(grads, state, params).compile().as_text()
    gathered = [line.split("=")[1].split("{")[0].strip() for line in hlo.splitlines()
                if "all-gather(" in line]  # fmt: skip
    if not gathers:
      assert not gathered, f"{name}: the compiled update gathers {gathered}"
    else:  # the Kronecker layer's gradient rows, never a factor or another leaf
      assert gathered and set(gathered) == {"f32[16,8]"}, gathered
  updates, _ = update(grads, state, params)
  if mesh is not None:
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.sharding.is_equivalent_to(p.sharding, p.ndim), (name, u.sharding, p.sharding)
  return updates


def check_state(name, state, params, mesh, task):
  inner = state[0]
  if name in ("gpm", "sgp"):
    like_params = []
    matrices = jax.tree.leaves(inner.feature_basis if name == "gpm" else inner.sgp_basis)
    matrices += jax.tree.leaves(getattr(inner, "sgp_importance", []))
  elif name == "trgp":
    like_params = []
    matrices = jax.tree.leaves((inner.trgp_basis, inner.trgp_task_basis, inner.trgp_selected))
  elif name == "nscl":
    like_params = []
    matrices = jax.tree.leaves((inner.nscl_covariance, inner.nscl_basis))
  else:
    like_params = [inner.prior_mean, {"table": inner.prior_precision["table"]}]
    matrices = [m for k in inner.kron.values() for m in k]
  by_path = {jax.tree_util.keystr(k): p for k, p in jax.tree_util.tree_leaves_with_path(params)}
  for tree in like_params:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      p = by_path[jax.tree_util.keystr(path)]
      assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), (name, task, path)
  assert matrices, name
  for m in matrices:
    assert replicated(m), (name, task, m.shape, m.sharding)


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  host = values(0)

  def place(specs):
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    return jax.tree.map(put, host, specs, is_leaf=lambda x: isinstance(x, P))

  run("ncl_kfac", place(SPECS["input_split"]), mesh, gathers=True)
  print("ncl_kfac with the input axis split: gathers the layer's gradient only", flush=True)
  for name in TRANSFORMS:
    params = place(SPECS[name])
    sharded = run(name, params, mesh)
    single = run(name, host, None)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print(f"{name}: ok", flush=True)


if __name__ == "__main__":
  main()
