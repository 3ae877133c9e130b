"""EWC, online EWC, MAS and SI against jax.grad of their penalties and numpy hand computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

from conftest import make_params


def _rand(params, seed, fn=jax.random.normal):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [fn(k, p.shape) for k, p in zip(keys, leaves)])


def _uniform(params, seed):
  return _rand(params, seed, jax.random.uniform)


def _quad(omega, theta, anchor):
  return sum(
    0.5 * jnp.sum(o * (t - a) ** 2)
    for o, t, a in zip(jax.tree.leaves(omega), jax.tree.leaves(theta), jax.tree.leaves(anchor))
  )


def _run(tx, tasks, theta, grads):
  """Consolidates (params_k, importance_k) in turn, then one update at theta."""
  state = tx.init(tasks[0][0])
  for p, imp in tasks:
    state = cl_optax.consolidate(state, p, importance=imp)
  return jax.jit(tx.update)(grads, state, theta)[0]


def _tasks(params, n=3):
  return [(_rand(params, 10 + k), _uniform(params, 20 + k)) for k in range(n)]


def test_ewc_gradient_is_grad_of_one_penalty_per_task():
  params, lam = make_params(), 3.0
  tasks, theta, g = _tasks(params), _rand(params, 1), _rand(params, 2)
  got = _run(cl_optax.ewc(lam), tasks, theta, g)

  def penalty(t):
    return lam * sum(_quad(imp, t, anchor) for anchor, imp in tasks)

  want = jax.tree.map(jnp.add, g, jax.grad(penalty)(theta))
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_online_ewc_gradient_is_grad_of_decayed_penalty():
  params, lam, gamma = make_params(), 2.0, 0.7
  tasks, theta, g = _tasks(params), _rand(params, 1), _rand(params, 2)
  got = _run(cl_optax.online_ewc(lam, decay=gamma), tasks, theta, g)
  fisher = jax.tree.map(lambda a, b, c: gamma**2 * a + gamma * b + c, *[imp for _, imp in tasks])
  penalty = lambda t: lam * _quad(fisher, t, tasks[-1][0])  # noqa: E731
  want = jax.tree.map(jnp.add, g, jax.grad(penalty)(theta))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_mas_gradient_is_grad_of_summed_penalty():
  params, lam = make_params(), 0.5
  tasks, theta, g = _tasks(params, 2), _rand(params, 1), _rand(params, 2)
  got = _run(cl_optax.mas(lam), tasks, theta, g)
  omega = jax.tree.map(jnp.add, tasks[0][1], tasks[1][1])
  penalty = lambda t: lam * _quad(omega, t, tasks[-1][0])  # noqa: E731
  want = jax.tree.map(jnp.add, g, jax.grad(penalty)(theta))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_penalty_before_consolidate_and_inject_changes_strength():
  params = make_params()
  g, theta = _rand(params, 2), _rand(params, 3)
  for tx in (cl_optax.ewc(5.0), cl_optax.online_ewc(5.0), cl_optax.mas(5.0), cl_optax.si(5.0)):
    out, _ = tx.update(g, tx.init(params), theta)
    chex.assert_trees_all_close(out, g)
  tx = optax.inject_hyperparams(cl_optax.online_ewc)(strength=1.0, decay=0.5)
  state = cl_optax.consolidate(tx.init(params), params, importance=_uniform(params, 4))
  state.hyperparams["strength"] = jnp.asarray(4.0)
  state.hyperparams["decay"] = jnp.asarray(0.25)
  got, state = tx.update(g, state, theta)
  want, _ = cl_optax.online_ewc(4.0).update(
    g,
    cl_optax.consolidate(
      cl_optax.online_ewc(4.0).init(params), params, importance=_uniform(params, 4)
    ),
    theta,
  )
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  # the injected decay is the one consolidate uses
  state = cl_optax.consolidate(state, params, importance=_uniform(params, 5))
  fisher = optax.tree.get(state, "online_ewc_importance")
  want_f = jax.tree.map(lambda a, b: 0.25 * a + b, _uniform(params, 4), _uniform(params, 5))
  chex.assert_trees_all_close(fisher, want_f, rtol=1e-6)


# ------------------------------------------------------------------------- SI

H = np.array([1.0, 3.0, 0.5, 2.0])
CENTRE = np.array([1.0, -2.0, 0.5, 3.0])


def _loss_grad(theta):  # quadratic loss 0.5 * sum h (theta - c)^2
  return H * (theta - CENTRE)


def _numpy_si(
  base, steps, theta0, xi, lam=0.0, omega_prev=None, anchor=None, include=False, adam=None
):
  """Hand computation: omega = sum_t -g_t * (theta_{t+1} - theta_t); Omega = omega / (D^2 + xi).

  ``adam`` = (m, v, count) carried over from the previous task (optax keeps it).
  """
  theta = theta0.copy()
  omega = np.zeros_like(theta)
  m, v, t0 = adam if adam is not None else (np.zeros_like(theta), np.zeros_like(theta), 0)
  for t in range(t0, t0 + steps):
    g = _loss_grad(theta)
    pen = 0.0 if omega_prev is None else lam * omega_prev * (theta - anchor)
    total = g + pen
    if base == "sgd":
      step = -0.1 * total
    else:  # adam(0.1), b1=0.9, b2=0.999, eps=1e-8
      m = 0.9 * m + 0.1 * total
      v = 0.999 * v + 0.001 * total**2
      mh, vh = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
      step = -0.1 * mh / (np.sqrt(vh) + 1e-8)
    omega += -(total if include else g) * step
    theta = theta + step
  return theta, omega / ((theta - theta0) ** 2 + xi), (m, v, t0 + steps)


def _train_si(tx, state, theta, steps):
  step = jax.jit(tx.update)
  for _ in range(steps):
    g = jnp.asarray(_loss_grad(np.asarray(theta, np.float64)), jnp.float32)
    u, state = step(g, state, theta)
    theta = optax.apply_updates(theta, u)
  return theta, state


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("include", [False, True])
def test_si_omega_matches_hand_computation(base, include):
  xi, lam, steps = 0.1, 2.0, 12
  opt = optax.sgd(0.1) if base == "sgd" else optax.adam(0.1)
  tx = optax.chain(cl_optax.si(lam, xi=xi, include_penalty=include), opt)
  theta0 = np.array([0.0, 0.5, -1.0, 2.0])
  theta = jnp.asarray(theta0, jnp.float32)
  state = tx.init(theta)
  theta, state = _train_si(tx, state, theta, steps)
  state = cl_optax.consolidate(state, theta)
  theta1, omega1, adam = _numpy_si(base, steps, theta0, xi)
  np.testing.assert_allclose(theta, theta1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "si_importance"), omega1, rtol=1e-3, atol=1e-5)
  # task 2: the penalty lam * Omega * (theta - theta1) is on; Omega accumulates
  theta, state = _train_si(tx, state, theta, steps)
  state = cl_optax.consolidate(state, theta)
  theta2, omega2, _ = _numpy_si(
    base, steps, theta1, xi, lam=lam, omega_prev=omega1, anchor=theta1, include=include, adam=adam
  )
  np.testing.assert_allclose(theta, theta2, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    optax.tree.get(state, "si_importance"), omega1 + omega2, rtol=2e-3, atol=1e-4
  )
  np.testing.assert_allclose(optax.tree.get(state, "si_anchor"), theta2, rtol=1e-4, atol=1e-4)


def test_si_sits_after_the_optimiser_too():
  # SI reads the param change from consecutive params, so after sgd it records the
  # sgd step as "gradient": omega = sum -(-lr g) * (-lr g) = -lr^2 sum g^2 ... in its own units.
  tx = optax.chain(optax.sgd(0.1), cl_optax.si(1.0, xi=0.1))
  theta0 = np.array([0.0, 0.5, -1.0, 2.0])
  theta = jnp.asarray(theta0, jnp.float32)
  theta, state = _train_si(tx, tx.init(theta), theta, 5)
  state = cl_optax.consolidate(state, theta)
  t = theta0.copy()
  omega = np.zeros(4)
  for _ in range(5):
    step = -0.1 * _loss_grad(t)
    omega += -step * step
    t = t + step
  np.testing.assert_allclose(
    optax.tree.get(state, "si_importance"), omega / ((t - theta0) ** 2 + 0.1), rtol=1e-4
  )


def test_errors_are_explicit():
  params = make_params()
  for tx, name in (
    (cl_optax.ewc(), "ewc"),
    (cl_optax.online_ewc(), "online_ewc"),
    (cl_optax.mas(), "mas"),
  ):
    state = tx.init(params)
    bad = jax.tree.map(lambda p: -jnp.ones(p.shape), params)
    with pytest.raises(ValueError, match=f"{name}: `importance` leaf .* negative"):
      cl_optax.consolidate(state, params, importance=bad)
    nan = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan), params)
    with pytest.raises(ValueError, match="non-finite"):
      cl_optax.consolidate(state, params, importance=nan)
    wrong = dict(params, scale=jnp.ones(3))
    with pytest.raises(ValueError, match="has shape"):
      cl_optax.consolidate(state, params, importance=wrong)
    with pytest.raises(ValueError, match="needs `params`"):
      tx.update(params, state)
  with pytest.raises(ValueError, match="si: update needs `params`"):
    cl_optax.si().update(params, cl_optax.si().init(params))


def test_si_nonnegative_clips_the_summed_importance_as_zenkes_relu():
  """Zenke's merge: Omega <- relu(Omega + omega / (Delta^2 + xi)); the default keeps negatives."""
  p0 = {"w": jnp.array([1.0, 1.0])}
  g = {"w": jnp.array([1.0, -1.0])}
  step = {"w": jnp.array([0.1, 0.1])}  # w[0] moves up the loss: omega < 0 there
  out = {}
  for nonneg in (False, True):
    tx = cl_optax.si(1.0, xi=0.1, nonnegative=nonneg)
    state, p = tx.init(p0), p0
    _, state = tx.update(g, state, p)
    p = optax.apply_updates(p, step)
    state = cl_optax.consolidate(state, p)
    out[nonneg] = np.asarray(optax.tree.get(state, "si_importance")["w"])
  omega = -np.array([1.0, -1.0]) * 0.1
  expected = omega / (0.1**2 + 0.1)
  np.testing.assert_allclose(out[False], expected, rtol=1e-6)
  np.testing.assert_allclose(out[True], np.maximum(expected, 0.0), rtol=1e-6)
  assert out[False][0] < 0 and out[True][0] == 0.0
