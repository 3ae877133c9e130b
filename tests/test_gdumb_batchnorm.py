"""GDumb's BatchNorm network (`bn=1`): batch statistics and the fold into the runner's MLP."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.continual.methods.class_il import _BatchNormNet
from benchmarks.continual.model import mlp_init, mlp_tapped

_SIZES = (6, 5, 4, 3)


def _setup(seed=0):
  params = mlp_init(jax.random.PRNGKey(seed), _SIZES)
  net = _BatchNormNet()
  (kernels, bn), stats = net.init(params)
  rng = np.random.default_rng(seed)
  bn = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32) + v, bn)
  stats = {n: {"mean": jnp.asarray(rng.normal(size=s["mean"].shape), jnp.float32),
               "var": jnp.asarray(rng.uniform(0.5, 2.0, size=s["var"].shape), jnp.float32)}
           for n, s in stats.items()}  # fmt: skip
  return net, kernels, bn, stats, rng


def test_fold_equals_the_eval_mode_batchnorm_network():
  net, kernels, bn, stats, rng = _setup()
  x = rng.normal(size=(7, _SIZES[0])).astype(np.float32)
  h = x.astype(np.float64)
  names = list(kernels)
  for i, n in enumerate(names):  # torch eval mode: running statistics
    z = h @ np.asarray(kernels[n]["kernel"], np.float64)
    z = (z - np.asarray(stats[n]["mean"])) / np.sqrt(np.asarray(stats[n]["var"]) + net.eps)
    h = z * np.asarray(bn[n]["scale"]) + np.asarray(bn[n]["offset"])
    h = np.maximum(h, 0.0) if i < len(names) - 1 else h
  folded = net.fold((kernels, bn), stats)
  np.testing.assert_allclose(mlp_tapped(folded, jnp.asarray(x))[0], h, rtol=1e-4, atol=1e-5)


def test_batch_statistics_skip_invalid_rows_and_update_running_stats():
  net, kernels, bn, stats, rng = _setup(1)
  x = rng.normal(size=(5, _SIZES[0])).astype(np.float32)
  w = np.array([1, 1, 1, 0, 0], np.float32)
  y = np.zeros(5, np.int32)
  seen = jnp.ones(_SIZES[-1], bool)
  _, new = net.loss((kernels, bn), stats, jnp.asarray(x), y, jnp.asarray(w), seen)
  z = x[:3].astype(np.float64) @ np.asarray(kernels["layer0"]["kernel"], np.float64)
  mu, var = z.mean(0), z.var(0, ddof=1)  # torch: biased var to normalise, unbiased to track
  old = {k: np.asarray(v) for k, v in stats["layer0"].items()}
  np.testing.assert_allclose(new["layer0"]["mean"], 0.9 * old["mean"] + 0.1 * mu, 1e-5, 1e-6)
  np.testing.assert_allclose(new["layer0"]["var"], 0.9 * old["var"] + 0.1 * var, 1e-5, 1e-6)
  # the invalid rows change nothing
  x2 = x.copy()
  x2[3:] = 100.0
  loss1, _ = net.loss((kernels, bn), stats, jnp.asarray(x), y, jnp.asarray(w), seen)
  loss2, new2 = net.loss((kernels, bn), stats, jnp.asarray(x2), y, jnp.asarray(w), seen)
  np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
  np.testing.assert_allclose(new2["head"]["var"], new["head"]["var"], rtol=1e-6)
