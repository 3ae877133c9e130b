"""RWalk against a numpy loop over steps written as the official code runs them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

SHAPES = {"a": (3,), "b": (2, 2)}
K, ALPHA, XI, LR, LAM, STEPS = 4, 0.9, 1e-3, 0.1, 2.0, 11


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  n = sum(int(np.prod(s)) for s in SHAPES.values())
  curv = rng.uniform(0.5, 2.0, (2, n))
  target = rng.normal(size=(2, n))
  noise = rng.normal(scale=0.3, size=(2, STEPS, n))
  return rng.normal(size=n), curv, target, noise


def _grad(theta, t, k, problem):
  _, curv, target, noise = problem
  return curv[t] * (theta - target[t]) + noise[t, k]


def _min_max(x):
  return (x - x.min()) / (x.max() - x.min() + 1e-32)


def _reference(problem, official):
  """The loop of agem's fc_permute_mnist.py (RWALK branch) and model.task_updates."""
  theta = problem[0].copy()
  fisher, acc, imp = (np.zeros_like(theta) for _ in range(3))
  anchor, window = theta.copy(), theta.copy()
  for t in range(2):
    tmp, small, score = (np.zeros_like(theta) for _ in range(3))
    for k in range(STEPS):
      if (k + 1) % K == 0:
        score += np.maximum(small / (XI + fisher * (theta - window) ** 2), 0.0)
        fisher = (1 - ALPHA) * fisher + ALPHA * tmp / K
        window, small = theta.copy(), np.zeros_like(theta)
        if not official:
          tmp = np.zeros_like(theta)
      g = _grad(theta, t, k, problem)
      tmp += g**2
      old = theta.copy()
      theta = theta - LR * (g + LAM * imp * (theta - anchor))  # loss has no 1/2: LAM = 2 lambda
      small -= g * (theta - old)
    acc = score if t == 0 else (1.5 if official else 0.5) * acc + 0.5 * score
    imp, anchor, window = _min_max(fisher) + _min_max(acc), theta.copy(), theta.copy()
  return theta, imp, fisher


def _unflat(x):
  out, i = {}, 0
  for name, shape in SHAPES.items():
    n = int(np.prod(shape))
    out[name] = jnp.asarray(x[i : i + n].reshape(shape), jnp.float32)
    i += n
  return out


def _flat(tree):
  return np.concatenate([np.asarray(tree[n]).ravel() for n in SHAPES])


@pytest.mark.parametrize("official", [False, True])
def test_rwalk_matches_the_official_loop(official):
  problem = _problem()
  tx = optax.chain(
    cl_optax.rwalk(LAM, alpha=ALPHA, every=K, xi=XI, official=official), optax.sgd(LR)
  )
  params = _unflat(problem[0])
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(2):
    for k in range(STEPS):
      grads = _unflat(_grad(_flat(params).astype(np.float64), t, k, problem))
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
    state = cl_optax.consolidate(state, params)
  theta, imp, fisher = _reference(problem, official)
  np.testing.assert_allclose(_flat(params), theta, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(
    _flat(optax.tree.get(state, "rwalk_importance")), imp, rtol=2e-3, atol=2e-4
  )
  np.testing.assert_allclose(
    _flat(optax.tree.get(state, "rwalk_fisher")), fisher, rtol=2e-4, atol=1e-6
  )
  # the network-wide normalisation: the two maps each span [0, 1] over all leaves together
  assert 1.0 < imp.max() <= 2.0 and imp.min() >= 0.0


def test_rwalk_forms_differ_and_no_penalty_before_consolidate():
  params = _unflat(_problem()[0])
  g = jax.tree.map(jnp.ones_like, params)
  for official in (False, True):
    tx = cl_optax.rwalk(5.0, official=official)
    out, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(_flat(out), _flat(g))
  with pytest.raises(ValueError, match=r"rwalk: `every`"):
    cl_optax.rwalk(every=0)
