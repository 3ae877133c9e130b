"""TRGP (`cl_optax.trgp`): numpy transcriptions of the official growth and trust region, W_eff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

D, OUT = 8, 3


def np_grow(space, x, thr, task, official):
  """``get_space_and_grad`` of LYang-666/TRGP ``main_pmnist.py`` for one layer (numpy)."""
  R = x.T.astype(np.float64)
  if task == 0:
    U, S, _ = np.linalg.svd(R, full_matrices=False)
    r = int(np.sum(np.cumsum(S**2) / np.sum(S**2) < thr))
    return U[:, :r], U[:, :r]
  delta = np.array([m @ R @ R.T @ m for m in space.T])
  total = np.sum(R**2)
  U, S, _ = np.linalg.svd(R - space @ space.T @ R, full_matrices=False)
  stack = np.hstack((delta, S**2))
  order = np.argsort(stack)[::-1]
  r, acc = 0, 0.0
  for v in np.sort(stack)[::-1]:
    if acc >= thr * total:
      break
    acc, r = acc + v, r + 1
  Ui = np.hstack((space, U))
  sel = order[:r]
  new = sel[sel > len(delta)] if official else sel[sel >= len(delta)]
  return Ui[:, sel], np.hstack((space, Ui[:, new]))


def task_inputs(seed, n=12, rank=4):
  """Inputs of rank ``rank`` with decaying energies (so the thresholds choose)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :rank]
  return (rng.normal(size=(n, rank)) * np.linspace(3.0, 0.5, rank)) @ basis.T


def proj(m):
  return m @ m.T


@pytest.mark.parametrize("official", [False, True])
def test_growth_matches_the_official_code(official):
  params = {"k": jnp.zeros((D, OUT))}
  tx = cl_optax.trgp(0.9, max_tasks=4, official=official)
  state = tx.init(params)
  space = np.zeros((D, 0))
  for t, seed in enumerate([0, 1, 2]):
    x = task_inputs(seed)
    state = cl_optax.consolidate(state, params, representations={"k": jnp.asarray(x)})
    own, space = np_grow(space, x, 0.9, t, official)
    count = int(state.trgp_count["k"])
    assert count == space.shape[1], (t, count, space.shape)
    glob = np.asarray(state.trgp_basis["k"])[:, :count]
    np.testing.assert_allclose(proj(glob), proj(space), atol=1e-4)
    k = int(state.trgp_task_count["k"][t])
    assert k == own.shape[1]
    np.testing.assert_allclose(
      proj(np.asarray(state.trgp_task_basis["k"][t])), proj(own), atol=1e-4
    )
  assert int(state.trgp_tasks) == 3


def np_trust_region(g, bases, task, eps, official):
  """``grad_proj_cond``: projection norms, regimes, top-2 (``[0]`` / ``[1]`` for tasks 1 / 2)."""
  norms = np.array([np.linalg.norm(b @ b.T @ g) for b in bases[:task]])
  regime2 = norms > eps * np.linalg.norm(g)
  if official and task in (1, 2):
    sel = [task - 1]
  else:
    sel = list(np.argsort(norms)[::-1][: min(2, task)])
  return {int(s) for s in sel if regime2[s]}


@pytest.mark.parametrize("official", [False, True])
def test_trust_region_matches_the_official_selection(official):
  rng = np.random.default_rng(5)
  bases = np.zeros((5, D, D))
  for t in range(5):  # task t's subspace: 2 + t columns
    bases[t, :, : 2 + t] = np.linalg.qr(rng.normal(size=(D, D)))[0][:, : 2 + t]
  for task in range(1, 5):
    for seed in range(4):
      g = np.random.default_rng(10 * task + seed).normal(size=(D, OUT))
      g[: task + 1] *= 4.0  # lean toward some subspaces
      sel, act = cl_optax.trgp_trust_region(
        jnp.asarray(g), jnp.asarray(bases), task, 0.45, official=official
      )
      got = {int(s) for s, a in zip(np.asarray(sel), np.asarray(act)) if a}
      assert got == np_trust_region(g, bases, task, 0.45, official), (task, seed)


def test_scaled_kernel_matches_numpy():
  rng = np.random.default_rng(6)
  w = rng.normal(size=(D, OUT))
  bases = np.zeros((2, D, 5))
  bases[0, :, :4] = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :4]
  bases[1, :, :3] = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :3]
  q = rng.normal(size=(2, 4, 4))  # narrower than the stored 5 columns: the leading 4
  for active in ([True, True], [False, True]):
    view = cl_optax.TRGPView(jnp.asarray(bases), jnp.asarray(active))
    got = cl_optax.trgp_scaled_kernel(jnp.asarray(w), view, jnp.asarray(q))
    ref = w.copy()
    for s in range(2):
      if active[s]:
        m = bases[s, :, :4]
        ref = ref + m @ (q[s] - np.eye(4)) @ m.T @ w
    np.testing.assert_allclose(got, ref, atol=1e-5)
  # Q = I: W itself
  same = cl_optax.trgp_scaled_kernel(jnp.asarray(w), view, jnp.broadcast_to(jnp.eye(4), (2, 4, 4)))
  np.testing.assert_allclose(same, w, atol=1e-6)
  with pytest.raises(ValueError, match="trgp_scaled_kernel: q has shape"):
    cl_optax.trgp_scaled_kernel(jnp.asarray(w), view, jnp.zeros((2, 6, 6)))


TASKS, TOP, WIDTH = 4, 2, 4


def _labels(p):
  return {"net": jax.tree.map(lambda _: "net", p["net"]), "q": jax.tree.map(lambda _: "q", p["q"])}


TX = optax.partition(
  {
    "net": optax.chain(cl_optax.trgp(1.0, max_tasks=TASKS, layers="net/k"), optax.sgd(0.1)),
    "q": optax.sgd(0.1),
  },
  _labels,
)
TRACES = []


def _out(params, opt_state, x, task):
  view = cl_optax.trgp_view(opt_state, task, WIDTH)["net"]["k"]
  return x @ cl_optax.trgp_scaled_kernel(params["net"]["k"], view, params["q"]["k"][task])


@jax.jit
def _step(params, opt_state, x, y, task):
  TRACES.append(1)
  grads = jax.grad(lambda p: jnp.mean((_out(p, opt_state, x, task) - y) ** 2))(params)
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def test_q_routed_by_partition_and_old_outputs_unchanged_with_q_fixed():
  rng = np.random.default_rng(7)
  eye = jnp.broadcast_to(jnp.eye(WIDTH), (TASKS, TOP, WIDTH, WIDTH))
  params = {"net": {"k": jnp.asarray(rng.normal(size=(D, OUT)), jnp.float32)}, "q": {"k": eye}}
  opt_state = TX.init(params)
  xs = [jnp.asarray(task_inputs(s, rank=3), jnp.float32) for s in (0, 1)]
  xs.append(xs[1][:, ::-1] * 0.5 + xs[0])  # task 2 shares directions with both
  ys = [jnp.asarray(rng.normal(size=(12, OUT)), jnp.float32) for _ in range(3)]
  for t in range(3):
    if t > 0:  # the trust region of task t from its gradient at the start
      g = jax.grad(lambda p: jnp.mean((_out(p, opt_state, xs[t], t) - ys[t]) ** 2))(params)
      opt_state = cl_optax.consolidate(opt_state, params, next_grads=g)
    before = [_out(params, opt_state, xs[j], j) for j in range(t)]
    q_before = params["q"]["k"]
    for _ in range(5):
      params, opt_state = _step(params, opt_state, xs[t], ys[t], t)
    for j in range(1, t):  # old tasks' outputs with their own (fixed) Q
      np.testing.assert_allclose(_out(params, opt_state, xs[j], j), before[j], atol=1e-4)
    np.testing.assert_array_equal(params["q"]["k"][:t], q_before[:t])
    opt_state = cl_optax.consolidate(opt_state, params, representations={"net": {"k": xs[t]}})
  view2 = cl_optax.trgp_view(opt_state, 2, WIDTH)["net"]["k"]
  assert bool(view2.active.any())  # task 2 scaled some old subspace
  assert not np.allclose(params["q"]["k"][2], eye[2])  # and trained its Q
  assert len(TRACES) == 1  # no retrace across consolidates


def test_bad_inputs():
  params = {"k": jnp.zeros((D, OUT))}
  tx = cl_optax.trgp(0.9, max_tasks=1)
  state = tx.init(params)
  with pytest.raises(ValueError, match="trgp.*representations.*next_grads"):
    cl_optax.consolidate(state, params)
  state = cl_optax.consolidate(state, params, representations={"k": jnp.ones((3, D))})
  with pytest.raises(ValueError, match="trgp: 1 tasks already consolidated.*max_tasks"):
    cl_optax.consolidate(state, params, representations={"k": jnp.ones((3, D))})
  with pytest.raises(ValueError, match="trgp.*next_grads.*missing"):
    cl_optax.consolidate(state, params, next_grads={"other": jnp.ones((D, OUT))})
  with pytest.raises(ValueError, match="trgp: max_tasks"):
    cl_optax.trgp(max_tasks=0)
