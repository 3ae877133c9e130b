"""References that were missing: sampled K-FAC factors, non-finite gradients after consolidate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax
from cl_optax.importance import Batches, KronFactors, kfac_factors

from conftest import normal_like, normal_tree, psd, uniform_like


# ------------------------------------------------- kfac_factors(fisher="sampled")
def _tapped(p, x, taps):
  h = x @ p["dense"]["kernel"] + p["dense"]["bias"] + taps["dense"]
  return h, {"dense": x}


def test_sampled_kfac_factors_estimate_the_exact_ones_not_the_data_labels():
  """G of 'sampled' is a Monte-Carlo estimate of the exact E_{y~model}[d d^T].

  The labels given are all class 0, far from what the model predicts, so an
  estimator that used them (the empirical Fisher) would miss by far more than
  the Monte-Carlo error; A does not depend on the labels at all.
  """
  k = jax.random.split(jax.random.key(0), 3)
  p = {"dense": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.zeros(4)}}
  xs = jax.random.normal(k[1], (8, 500, 3))
  ys = jnp.zeros((8, 500), jnp.int32)
  b = Batches(xs, ys)
  fisher = {
    kind: kfac_factors(_tapped, p, b, layers=["dense"], fisher=kind, key=k[2])["dense"]
    for kind in ("sampled", "exact", "empirical")
  }
  np.testing.assert_allclose(fisher["sampled"].a, fisher["exact"].a, rtol=1e-6)

  def rel(g):
    return float(jnp.linalg.norm(g - fisher["exact"].g) / jnp.linalg.norm(fisher["exact"].g))

  assert rel(fisher["sampled"].g) < 0.05, rel(fisher["sampled"].g)  # 4000 samples
  assert rel(fisher["empirical"].g) > 0.5, rel(fisher["empirical"].g)
  # Another key: another sample, the same expectation.
  again = kfac_factors(
    _tapped, p, Batches(xs, ys), layers=["dense"], fisher="sampled", key=jax.random.key(9)
  )["dense"]
  assert not np.allclose(again.g, fisher["sampled"].g)
  assert rel(again.g) < 0.05


# ------------------------------------ non-finite gradients pass after consolidate
PARAMS = normal_tree(1, {"dense": {"kernel": (4, 3), "bias": (3,)}, "head": {"kernel": (3, 2)}})


def _signals():
  imp = uniform_like(PARAMS, 3)
  return {
    "freeze": {"importance": imp},
    "ogd": {
      "output_grads": jax.tree.map(lambda g: jnp.stack([g, 2 * g + 1]), normal_like(PARAMS, 5))
    },
    "gpm": {
      "representations": normal_tree(4, {"dense": {"kernel": (2, 4)}, "head": {"kernel": (2, 3)}})
    },
    "ncl_diag": {"precision": jax.tree.map(jnp.square, normal_like(PARAMS, 6))},
    "ncl_kfac": {
      "precision": {
        "dense": KronFactors(psd(34, 5), psd(35, 3)),
        "head": {"kernel": jnp.ones((3, 2))},
      }
    },
  }


TRANSFORMS = {
  "freeze": cl_optax.freeze,
  "ogd": lambda: cl_optax.ogd(4),
  "gpm": lambda: cl_optax.gpm(0.9, freeze_unprojected=False),
  "ncl_diag": lambda: cl_optax.ncl(10.0, strength=0.5, damping=0.1, radius=0.3),
  "ncl_kfac": lambda: cl_optax.ncl(
    10.0, strength=0.5, damping=0.1, radius=0.3, precision="kfac", layers=("dense",)
  ),
}


def _consolidated(name):
  tx, p = TRANSFORMS[name](), PARAMS
  return tx, cl_optax.consolidate(tx.init(p), p, **_signals()[name])


def _with(tree, path, index, value):
  leaf = tree[path[0]][path[1]]
  return {**tree, path[0]: {**tree[path[0]], path[1]: leaf.at[index].set(value)}}


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_non_finite_gradient_entries_pass_through_after_consolidate(name, bad):
  """Non-finite entries come out as they went in; what else happens is per method.

  * freeze, ncl (diag): element-wise, so every other entry is as for a finite
    gradient (ncl's trust-region norm leaves the entry out).
  * ogd: a global projection: the whole update passes unchanged.
  * gpm: a projection per kernel: that kernel passes unchanged, the others
    are projected as usual.
  * ncl (kfac): the Kronecker layer holding the entry (kernel and bias)
    passes unchanged: its matmuls would spread the entry over the layer;
    leaves outside it are preconditioned as usual.
  """
  tx, state = _consolidated(name)
  p, g = PARAMS, normal_like(PARAMS, 2)
  g_bad = _with(g, ("dense", "kernel"), (1, 2), bad)
  out = tx.update(g_bad, state, p)[0]
  ref = tx.update(_with(g, ("dense", "kernel"), (1, 2), 0.0), state, p)[0]
  got = np.asarray(out["dense"]["kernel"])
  assert got[1, 2] == bad or (np.isnan(bad) and np.isnan(got[1, 2]))
  keep = np.ones((4, 3), bool)
  keep[1, 2] = False
  finite_out = [got[keep], np.asarray(out["dense"]["bias"]), np.asarray(out["head"]["kernel"])]
  assert all(np.all(np.isfinite(x)) for x in finite_out), out
  if name in ("freeze", "ncl_diag"):
    np.testing.assert_allclose(got[keep], np.asarray(ref["dense"]["kernel"])[keep], rtol=1e-6)
    np.testing.assert_allclose(out["head"]["kernel"], ref["head"]["kernel"], rtol=1e-6)
  elif name == "ogd":
    jax.tree.map(lambda o, i: np.testing.assert_array_equal(o, i), out, g_bad)
  elif name == "gpm":
    np.testing.assert_array_equal(got[keep], np.asarray(g_bad["dense"]["kernel"])[keep])
    np.testing.assert_allclose(out["head"]["kernel"], ref["head"]["kernel"], rtol=1e-6)
    assert not np.allclose(ref["head"]["kernel"], g["head"]["kernel"])  # it was projected
  else:  # ncl_kfac
    np.testing.assert_array_equal(got[keep], np.asarray(g_bad["dense"]["kernel"])[keep])
    np.testing.assert_array_equal(out["dense"]["bias"], g_bad["dense"]["bias"])
    # The trust region scales the rest by the norm of the finite layers only.
    alone = optax.tree.get(tx.update(g, state, p)[0], "head")
    assert np.all(np.isfinite(np.asarray(alone["kernel"])))
