"""A-GEM, GEM, OGD and GPM against numpy references, quadprog and their properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cl_optax
from cl_optax.projection import solve_box_qp

from conftest import make_params

SETTINGS = settings(deadline=None, max_examples=20)


def _tree(seed, like, scale=1.0, lead=()):
  leaves, tree = jax.tree.flatten(like)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree,
    [scale * jax.random.normal(k, lead + p.shape, jnp.float32) for k, p in zip(keys, leaves)],
  )


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _unflat(vec, like):
  leaves, tree = jax.tree.flatten(like)
  out, i = [], 0
  for p in leaves:
    out.append(jnp.asarray(vec[i : i + p.size].reshape(p.shape), jnp.float32))
    i += p.size
  return jax.tree.unflatten(tree, out)


PARAMS = make_params()
AGEM_UPDATE = jax.jit(
  lambda g, r: cl_optax.agem().update(g, cl_optax.agem().init(None), None, ref_grads=r)[0]
)


# ----------------------------------------------------------------- A-GEM


def agem_reference(g, r):
  g, r = _flat(g), _flat(r)
  dot = g @ r
  return g - dot / (r @ r) * r if dot < 0 else g


@SETTINGS
@given(st.integers(0, 2**30), st.floats(1e-3, 1e3), st.booleans())
def test_agem_matches_reference_and_constraint(seed, scale, flip):
  g = _tree(seed, PARAMS)
  r = _tree(seed + 1, PARAMS, scale)
  if flip:  # make the constraint violated for sure
    r = jax.tree.map(lambda x, y: x - 3 * y, r, g)
  got = AGEM_UPDATE(g, r)
  np.testing.assert_allclose(_flat(got), agem_reference(g, r), rtol=1e-5, atol=1e-5)
  gt, rf, gf = _flat(got), _flat(r), _flat(g)
  assert gt @ rf >= -1e-6 * np.linalg.norm(gf) * np.linalg.norm(rf)
  # idempotent: projecting again changes nothing
  again = AGEM_UPDATE(got, r)
  np.testing.assert_allclose(_flat(again), gt, rtol=1e-5, atol=1e-5 * np.linalg.norm(gf))


@SETTINGS
@given(st.integers(0, 2**30))
def test_agem_identity_when_constraint_holds(seed):
  g = _tree(seed, PARAMS)
  r = jax.tree.map(lambda x, y: x + 0.1 * y, g, _tree(seed + 7, PARAMS))  # g.r > 0
  assert _flat(g) @ _flat(r) > 0
  chex.assert_trees_all_equal(AGEM_UPDATE(g, r), g)


def test_agem_zero_or_absent_reference_is_identity():
  g = _tree(0, PARAMS)
  tx = cl_optax.agem()
  state = tx.init(PARAMS)
  zero = jax.tree.map(jnp.zeros_like, g)
  chex.assert_trees_all_equal(tx.update(g, state, PARAMS, ref_grads=zero)[0], g)
  chex.assert_trees_all_equal(tx.update(g, state, PARAMS)[0], g)


def test_agem_non_finite_passes_through_and_counts_projections():
  tx = cl_optax.agem()
  state = tx.init(PARAMS)
  g = _tree(0, PARAMS)
  g["scale"] = jnp.asarray(jnp.nan)
  r = jax.tree.map(lambda x: -x, _tree(0, PARAMS))
  out, state = tx.update(g, state, PARAMS, ref_grads=r)
  chex.assert_trees_all_equal(out, g)
  assert int(state.agem_projected) == 0
  _, state = tx.update(_tree(0, PARAMS), state, PARAMS, ref_grads=r)
  assert int(state.agem_projected) == 1


def test_agem_bfloat16_grads():
  g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(3, PARAMS))
  r = jax.tree.map(lambda x: (-x).astype(jnp.bfloat16), _tree(4, PARAMS))
  got = AGEM_UPDATE(g, r)
  chex.assert_trees_all_equal_dtypes(got, g)
  np.testing.assert_allclose(_flat(got), agem_reference(g, r), rtol=2e-2, atol=2e-2)


def test_agem_bad_reference_tree():
  tx = cl_optax.agem()
  state = tx.init(PARAMS)
  g = _tree(0, PARAMS)
  with pytest.raises(ValueError, match="agem: `ref_grads` must be a pytree like the updates"):
    tx.update(g, state, PARAMS, ref_grads={"dense": g["dense"]})
  bad = dict(g, scale=jnp.ones(2))
  with pytest.raises(ValueError, match=r"`ref_grads` leaf \['scale'\] has shape \(2,\); expected"):
    tx.update(g, state, PARAMS, ref_grads=bad)


class AgemJitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_same_with_and_without_jit(self):
    tx = cl_optax.agem()
    g, r = _tree(1, PARAMS), jax.tree.map(lambda x: -x, _tree(2, PARAMS))
    got, _ = self.variant(lambda g, r: tx.update(g, tx.init(PARAMS), PARAMS, ref_grads=r))(g, r)
    np.testing.assert_allclose(_flat(got), agem_reference(g, r), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- GEM

K = 20  # fixed max_tasks: one compile for every problem below
SMALL = {"a": jnp.zeros((6, 5)), "b": jnp.zeros((14,))}  # p = 44 >= K


def gem_quadprog(g, G, margin=0.5, eps=1e-3):
  """The official `project2cone2` set-up, solved by quadprog in float64."""
  import quadprog

  t = G.shape[0]
  P = G @ G.T
  P = 0.5 * (P + P.T) + eps * np.eye(t)
  q = -(G @ g)
  if np.all(q <= 0):  # no violated constraint: the official code does not project
    return g
  v = quadprog.solve_qp(P, q, np.eye(t), np.zeros(t) + margin)[0]
  return G.T @ v + g


def _gem_update(strength=0.5, eps=1e-3):
  tx = cl_optax.gem(strength, max_tasks=K, eps=eps)
  return jax.jit(lambda g, tg, m: tx.update(g, tx.init(None), None, task_grads=tg, task_mask=m))


GEM_UPDATE = _gem_update()
GEM_UPDATE_EXACT = _gem_update(eps=0.0)


def _gem_problem(rng, k, correlated):
  G = rng.normal(size=(K, 44)) * rng.lognormal(0, 1, size=(K, 1))
  if correlated:
    G = G[:1] + 0.3 * G
  g = rng.normal(size=44)
  mask = np.zeros(K, bool)
  mask[rng.choice(K, k, replace=False)] = True
  return g, G, mask


def test_gem_matches_quadprog_up_to_20_constraints():
  rng = np.random.default_rng(0)
  projected = 0
  for trial in range(60):
    k = 1 + trial % K
    g, G, mask = _gem_problem(rng, k, correlated=trial % 2 == 1)
    tg = {"a": G[:, :30].reshape(K, 6, 5), "b": G[:, 30:]}
    out, state = GEM_UPDATE(_unflat(g, SMALL), jax.tree.map(jnp.asarray, tg), mask)
    got = _flat(out)
    Gv = G[mask]
    if np.all(Gv @ g >= 0):
      np.testing.assert_array_equal(got, g.astype(np.float32))
      continue
    projected += int(state.gem_projected)
    want = gem_quadprog(g, Gv)
    scale = np.linalg.norm(Gv, axis=1) * max(np.linalg.norm(g), np.linalg.norm(want))
    # accuracy on the constraints <g~, g_k>, relative to |g_k| |g~|
    np.testing.assert_array_less(np.abs(Gv @ got - Gv @ want) / scale, 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.linalg.norm(want))
  assert projected > 30


@SETTINGS
@given(st.integers(0, 2**30), st.integers(1, K), st.booleans())
def test_gem_constraints_hold_and_masked_rows_are_ignored(seed, k, correlated):
  rng = np.random.default_rng(seed)
  g, G, mask = _gem_problem(rng, k, correlated)
  G_garbage = np.where(mask[:, None], G, 1e3 * rng.normal(size=G.shape))
  tg = lambda G: {"a": jnp.asarray(G[:, :30].reshape(K, 6, 5)), "b": jnp.asarray(G[:, 30:])}  # noqa: E731
  out, _ = GEM_UPDATE_EXACT(_unflat(g, SMALL), tg(G_garbage), mask)
  got = _flat(out)
  Gv = G[mask]
  tol = 1e-5 * np.linalg.norm(Gv, axis=1) * max(np.linalg.norm(g), np.linalg.norm(got))
  assert np.all(Gv @ got >= -tol)
  # masked rows make no difference
  out2, _ = GEM_UPDATE_EXACT(_unflat(g, SMALL), tg(np.where(mask[:, None], G, 0.0)), mask)
  np.testing.assert_allclose(got, _flat(out2), rtol=1e-5, atol=1e-5 * np.linalg.norm(got))


SOLVE = jax.jit(solve_box_qp)


@SETTINGS
@given(st.integers(0, 2**30), st.sampled_from([3, K]))
def test_box_qp_kkt(seed, k):
  rng = np.random.default_rng(seed)
  G = rng.normal(size=(k, 3 * k)) * rng.lognormal(0, 1, size=(k, 1))
  P = G @ G.T + 1e-3 * np.eye(k)
  c = G @ rng.normal(size=3 * k)
  lb = rng.uniform(0, 1, size=k)
  v = np.asarray(SOLVE(P, c, lb), np.float64)
  lam = P @ v + c  # multipliers of v >= lb
  d = np.sqrt(np.diag(P))
  scale = d * (np.linalg.norm(c / d) + d @ lb)
  assert np.all(v >= lb - 1e-7)  # primal feasibility
  assert np.all(lam >= -1e-5 * scale)  # dual feasibility
  assert np.all(np.abs(lam * (v - lb)) <= 1e-5 * scale * (1 + np.abs(v)))  # complementarity


def test_gem_identity_without_violation_or_without_task_grads():
  tx = cl_optax.gem(max_tasks=3)
  state = tx.init(PARAMS)
  g = _tree(0, PARAMS)
  tg = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 0 * x]), g)  # <g, g_k> >= 0
  out, state = tx.update(g, state, PARAMS, task_grads=tg)
  chex.assert_trees_all_equal(out, g)
  assert int(state.gem_projected) == 0
  chex.assert_trees_all_equal(tx.update(g, state, PARAMS)[0], g)


def test_gem_non_finite_passes_through():
  tx = cl_optax.gem(max_tasks=2)
  g = _tree(0, PARAMS)
  g["dense"]["bias"] = g["dense"]["bias"].at[0].set(jnp.inf)
  tg = jax.tree.map(lambda x: jnp.stack([-x, -x]), _tree(0, PARAMS))
  out, _ = tx.update(g, tx.init(PARAMS), PARAMS, task_grads=tg)
  chex.assert_trees_all_equal(out, g)


@pytest.mark.slow
def test_gem_bfloat16_grads_and_jit_equality():
  tx = cl_optax.gem(max_tasks=3)
  g = _tree(1, PARAMS)
  tg = _tree(2, PARAMS, lead=(3,))
  mask = jnp.array([True, False, True])
  f = lambda g, tg: tx.update(g, tx.init(PARAMS), PARAMS, task_grads=tg, task_mask=mask)[0]  # noqa: E731
  eager, jitted = f(g, tg), jax.jit(f)(g, tg)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
  want = gem_quadprog(_flat(g), np.stack([_flat(jax.tree.map(lambda x: x[i], tg)) for i in (0, 2)]))
  np.testing.assert_allclose(_flat(eager), want, rtol=1e-4, atol=1e-4)
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (g, tg))
  got = jax.jit(f)(*bf)
  chex.assert_trees_all_equal_dtypes(got, bf[0])
  np.testing.assert_allclose(_flat(got), want, rtol=5e-2, atol=5e-2)


def test_gem_bad_inputs():
  tx = cl_optax.gem(max_tasks=3)
  state = tx.init(PARAMS)
  g = _tree(0, PARAMS)
  tg = _tree(1, PARAMS, lead=(3,))
  with pytest.raises(
    ValueError,
    match=r"gem: `task_grads` leaf \['dense'\]\['bias'\] has shape \(4, 3\); expected \(3, 3\)",
  ):
    tx.update(g, state, PARAMS, task_grads=_tree(1, PARAMS, lead=(4,)))
  with pytest.raises(ValueError, match="gem: `task_mask` has shape \\(2,\\); expected \\(3,\\)"):
    tx.update(g, state, PARAMS, task_grads=tg, task_mask=jnp.array([True, False]))
  with pytest.raises(ValueError, match="gem: `task_grads` must be a pytree like the updates"):
    tx.update(g, state, PARAMS, task_grads={"dense": tg["dense"]})


# ------------------------------------------------------------------- OGD


def _basis_rows(state):
  n = int(state.basis_count)
  basis = state.stacked_basis()
  return np.stack([_flat(jax.tree.map(lambda b: b[i], basis)) for i in range(n)])


def test_ogd_orthonormal_basis_and_orthogonal_updates():
  tx = cl_optax.ogd(8)
  state = tx.init(PARAMS)
  first = _tree(1, PARAMS, lead=(3,))
  state = cl_optax.consolidate(state, PARAMS, output_grads=first)
  # a second task whose directions include one already in the span
  dup = jax.tree.map(
    lambda a, b: jnp.concatenate([a[:1] * 2.0 + a[1:2], b]), first, _tree(2, PARAMS, lead=(2,))
  )
  state = cl_optax.consolidate(state, PARAMS, output_grads=dup)
  assert int(state.basis_count) == 3 + 2  # the dependent one is skipped
  B = _basis_rows(state)
  np.testing.assert_allclose(B @ B.T, np.eye(len(B)), atol=1e-5)
  stored = np.stack(
    [_flat(jax.tree.map(lambda x: x[i], t)) for t in (first, dup) for i in range(3)]
  )
  g = _tree(9, PARAMS)
  out, _ = jax.jit(tx.update)(g, state, PARAMS)
  gt = _flat(out)
  assert np.max(np.abs(stored @ gt)) <= 1e-5 * np.linalg.norm(_flat(g)) * np.max(
    np.linalg.norm(stored, axis=1)
  )
  np.testing.assert_allclose(gt, _flat(g) - B.T @ (B @ _flat(g)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ogd_basis_spans_every_stored_gradient_across_chunks():
  """Block Gram-Schmidt reads the stored rows in chunks of 256: the span stays exact."""
  like = {"w": jnp.zeros(290), "k": jnp.zeros((2, 5))}  # 300 parameters
  tx = cl_optax.ogd(300)
  update = jax.jit(tx.update)
  state = tx.init(like)
  g = _tree(7, like)
  stored, prev = np.zeros((0, 300)), None
  for task, n in enumerate((250, 30, 30)):
    cand = _tree(20 + task, like, lead=(n,))
    if prev is not None and task == 1:  # one candidate already in the span
      cand = jax.tree.map(lambda c, s: c.at[0].set(s[0] - 3.0 * s[1]), cand, prev)
    prev = cand
    state = cl_optax.consolidate(state, like, output_grads=cand)
    rows = np.stack([_flat(jax.tree.map(lambda c: c[i], cand)) for i in range(n)])
    stored = np.vstack([stored, rows])
    rank = np.linalg.matrix_rank(stored, tol=1e-4 * np.linalg.norm(stored, 2))  # float32 input
    assert int(state.basis_count) == rank == (250, 279, 300)[task]
    assert int(state.basis_dropped) == 0
    B = _basis_rows(state)
    np.testing.assert_allclose(B @ B.T, np.eye(rank), atol=5e-5)
    Q = np.linalg.svd(stored, full_matrices=False)[2][:rank]  # the same span, float64
    want = _flat(g) - Q.T @ (Q @ _flat(g))
    np.testing.assert_allclose(_flat(update(g, state, like)[0]), want, atol=5e-5, err_msg=task)


def test_ogd_blocks_span_the_directions_across_block_edges():
  """Blocks of 3, 3 and 1 rows: directions filling across block edges project as one basis."""
  tx = cl_optax.ogd(7, block_size=3)
  update = jax.jit(lambda g, s: tx.update(g, s, PARAMS)[0])
  state = tx.init(PARAMS)
  assert [jax.tree.leaves(b)[0].shape[0] for b in state.basis] == [3, 3, 1]
  g = _tree(11, PARAMS)
  np.testing.assert_array_equal(_flat(update(g, state)), _flat(g))  # nothing stored yet
  stored = np.zeros((0, _flat(g).size))
  for task, n in enumerate((2, 3, 2)):  # counts 2, 5, 7: the edges at 3 and 6 crossed
    cand = _tree(40 + task, PARAMS, lead=(n,))
    state = cl_optax.consolidate(state, PARAMS, output_grads=cand)
    stored = np.vstack([stored, [_flat(jax.tree.map(lambda c: c[i], cand)) for i in range(n)]])
    assert int(state.basis_count) == len(stored)
    B = _basis_rows(state)
    np.testing.assert_allclose(B @ B.T, np.eye(len(B)), atol=1e-5)
    Q = np.linalg.svd(stored, full_matrices=False)[2]  # the same span, float64
    want = _flat(g) - Q.T @ (Q @ _flat(g))
    np.testing.assert_allclose(_flat(update(g, state)), want, atol=1e-5, err_msg=str(task))
  # a non-finite entry makes every block's dot products non-finite: g passes through unchanged
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.size else x, g)
  np.testing.assert_array_equal(_flat(update(bad, state)), _flat(bad))
  with pytest.raises(ValueError, match=r"ogd: `basis` must be a tuple of 3 blocks"):
    tx.update(g, state._replace(basis=state.stacked_basis()), PARAMS)


def test_ogd_full_buffer_is_reported():
  tx = cl_optax.ogd(2)
  state = tx.init(PARAMS)
  grads = _tree(3, PARAMS, lead=(3,))
  with pytest.raises(ValueError, match="ogd: the basis is full: max_directions=2"):
    cl_optax.consolidate(state, PARAMS, output_grads=grads)
  traced = jax.jit(lambda s, o: cl_optax.consolidate(s, PARAMS, output_grads=o))(state, grads)
  assert int(traced.basis_count) == 2 and int(traced.basis_dropped) == 1


def test_ogd_bad_signal():
  state = cl_optax.ogd(4).init(PARAMS)
  bad = _tree(3, PARAMS, lead=(2,))
  bad["scale"] = jnp.ones((3,))
  with pytest.raises(ValueError, match=r"ogd: `output_grads` leaf \['scale'\] has shape \(3,\)"):
    cl_optax.consolidate(state, PARAMS, output_grads=bad)
  with pytest.raises(ValueError, match="needs the signal `output_grads=`"):
    cl_optax.consolidate(state, PARAMS, representations={})


def test_output_gradients_linear_model():
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
  apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
  x = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
  gtl = cl_optax.importance.output_gradients(apply, params, x, jnp.array([1, 0]))
  np.testing.assert_allclose(gtl["w"][0], np.outer(x[0], [0, 1]))
  np.testing.assert_allclose(gtl["w"][1], np.outer(x[1], [1, 0]))
  np.testing.assert_allclose(gtl["b"], [[0, 1], [1, 0]])
  avg = cl_optax.importance.output_gradients(apply, params, x)
  np.testing.assert_allclose(avg["w"][0], np.outer(x[0], [0.5, 0.5]))


# ------------------------------------------------------------------- GPM


def gpm_reference(M, X, thr, official=False):
  """Paper Eq. 5/8/9 in float64: the new basis columns for representation X [n, d].

  ``official``: the official main_pmnist.py's first task, r = #{cumulative energy < thr}.
  """
  R = X.T
  total = (R**2).sum()
  R_hat = R - M @ M.T @ R if M.shape[1] else R
  U, S, _ = np.linalg.svd(R_hat, full_matrices=False)
  if official and not M.shape[1]:
    return U[:, : int(np.sum(np.cumsum(S**2) / total < thr))]
  acc = (total - (R_hat**2).sum()) / total
  r = 0
  while acc < thr and r < len(S):
    acc += S[r] ** 2 / total
    r += 1
  return np.hstack([M, U[:, :r]])


@pytest.mark.parametrize("official", [False, True])
def test_gpm_matches_paper_and_projects_in_input_space(official):
  params = {"k": jnp.zeros((12, 5))}
  tx = cl_optax.gpm(0.9, official_rank=official)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  M = np.zeros((12, 0))
  for task in range(3):
    X = rng.normal(size=(30, 4)) @ rng.normal(size=(4, 12)) + 0.05 * rng.normal(size=(30, 12))
    state = cl_optax.consolidate(state, params, representations={"k": X})
    before, M = M.shape[1], gpm_reference(M, X, 0.9, official)
    if task == 0:  # the official rule keeps one column fewer on the first task
      assert before == 0 and M.shape[1] == (3 if official else 4), M.shape
    count = int(state.feature_count["k"])
    assert count == M.shape[1], (task, count, M.shape)
    B = np.asarray(state.feature_basis["k"])[:, :count]
    np.testing.assert_allclose(B.T @ B, np.eye(count), atol=1e-5)
    np.testing.assert_allclose(B @ B.T, M @ M.T, atol=1e-4)  # same subspace
  g = {"k": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)}
  out = jax.jit(tx.update)(g, state, params)[0]["k"]
  np.testing.assert_allclose(B.T @ np.asarray(out), 0.0, atol=1e-5)
  np.testing.assert_allclose(out, g["k"] - B @ (B.T @ g["k"]), atol=1e-5)


@pytest.mark.slow
def test_gpm_projects_through_either_side_at_every_width():
  """Every filled rank, small (basis side) or large (complement side), projects exactly."""
  d_in = 40  # widths 0, 16, 20: ranks 3 and 17 on the basis side, 25 and 38 on the complement
  params = {"k": jnp.zeros((d_in, 3))}
  tx = cl_optax.gpm(1.0)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(3)
  g = {"k": jnp.asarray(rng.normal(size=(d_in, 3)), jnp.float32)}
  for rank in (0, 3, 17, 25, 38, 40):
    state = tx.init(params)
    if rank:
      X = rng.normal(size=(rank, d_in))
      state = cl_optax.consolidate(state, params, representations={"k": X})
    assert int(state.feature_count["k"]) == rank
    Q = np.asarray(state.feature_basis["k"], np.float64)
    if rank:
      np.testing.assert_allclose(Q.T @ Q, np.eye(d_in), atol=1e-5)  # basis + complement
    B = Q[:, :rank]
    want = np.asarray(g["k"]) - B @ (B.T @ np.asarray(g["k"]))
    np.testing.assert_allclose(update(g, state, params)[0]["k"], want, atol=2e-5, err_msg=rank)


@pytest.mark.slow
def test_gpm_preserves_old_outputs_in_flax():
  """Threshold 1: the outputs at the stored samples do not move under projected SGD."""
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.lin1 = nnx.Linear(16, 12, use_bias=False, rngs=rngs)
      self.lin2 = nnx.Linear(12, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.lin2(jax.nn.relu(self.lin1(x)))

    def layer_inputs(self, x):  # keys mirror nnx.state(self, nnx.Param)
      return {"lin1": {"kernel": x}, "lin2": {"kernel": jax.nn.relu(self.lin1(x))}}

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(cl_optax.gpm(1.0), optax.sgd(0.1)), wrt=nnx.Param)
  rng = np.random.default_rng(1)
  x_old = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  before = model(x_old)
  params = nnx.state(model, nnx.Param)
  cl_optax.consolidate(optimizer, params, representations=model.layer_inputs(x_old))
  x_new = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  y_new = jnp.asarray(rng.integers(0, 3, 32))

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x_new), y_new).mean()  # noqa: E731
    optimizer.update(model, nnx.grad(loss)(model))

  w0 = np.asarray(model.lin1.kernel.get_value())
  for _ in range(5):
    step(model, optimizer)
  assert np.abs(np.asarray(model.lin1.kernel.get_value()) - w0).max() > 1e-3  # it learns
  np.testing.assert_allclose(model(x_old), before, atol=1e-4)


def test_gpm_freezes_unprojected_leaves_after_first_task():
  params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
  reps = {"representations": {"kernel": jnp.eye(3)[:1]}}
  g = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
  for freeze, want in [(True, 0.0), (False, 1.0)]:
    tx = cl_optax.gpm(0.9, freeze_unprojected=freeze)
    state = tx.init(params)
    chex.assert_trees_all_equal(tx.update(g, state, params)[0], g)  # first task: identity
    state = cl_optax.consolidate(state, params, **reps)
    np.testing.assert_array_equal(tx.update(g, state, params)[0]["bias"], want)


def test_gpm_freeze_leaves_unprojected_kernels_training():
  """`layers=` without the head: the head's kernel trains, the trunk's bias freezes."""
  params = {
    "trunk": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
    "head": {"kernel": jnp.zeros((2, 4))},
  }
  layers = {"trunk": {"kernel": True, "bias": False}, "head": {"kernel": False}}
  g = jax.tree.map(jnp.ones_like, params)
  tx = cl_optax.gpm(0.9, layers=layers, freeze_unprojected=True)
  state = cl_optax.consolidate(
    tx.init(params), params, representations={"trunk": {"kernel": jnp.eye(3)[:1]}}
  )
  out = tx.update(g, state, params)[0]
  np.testing.assert_array_equal(out["head"]["kernel"], 1.0)  # left out of layers=: trains
  np.testing.assert_array_equal(out["trunk"]["bias"], 0.0)  # 1-D and unprojected: frozen
  np.testing.assert_array_equal(out["trunk"]["kernel"][0], 0.0)  # projected
  masked = optax.masked(tx, {"trunk": {"kernel": True, "bias": True}, "head": {"kernel": False}})
  state = cl_optax.consolidate(
    masked.init(params), params, representations={"trunk": {"kernel": jnp.eye(3)[:1]}}
  )
  np.testing.assert_array_equal(masked.update(g, state, params)[0]["head"]["kernel"], 1.0)


def test_gpm_bad_signals():
  params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
  state = cl_optax.gpm().init(params)
  with pytest.raises(ValueError, match=r"gpm: `representations` leaf \['kernel'\] has shape"):
    cl_optax.consolidate(state, params, representations={"kernel": jnp.ones((4, 2))})
  with pytest.raises(ValueError, match=r"missing \[\"\['kernel'\]\"\]"):
    cl_optax.consolidate(state, params, representations={"other": jnp.ones((4, 3))})
  with pytest.raises(ValueError, match="expected a value in \\[0, 1\\]"):
    cl_optax.consolidate(
      state, params, representations={"kernel": jnp.ones((4, 3))}, threshold={"kernel": 1.5}
    )
  with pytest.raises(ValueError, match="needs the signal `representations=`"):
    cl_optax.consolidate(state, params, output_grads={})


OGD_TX = cl_optax.ogd(6)
OGD_UPDATE = jax.jit(OGD_TX.update)
GPM_PARAMS = {
  "dense": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)},
  "conv": jnp.zeros((2, 2, 3, 4)),
}
GPM_TX = cl_optax.gpm(0.95)
GPM_UPDATE = jax.jit(GPM_TX.update)


@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**30), st.floats(1e-2, 1e2))
def test_ogd_property_orthogonal_and_idempotent(seed, scale):
  state = OGD_TX.init(PARAMS)
  for task in range(2):
    out_grads = _tree(seed + task, PARAMS, scale, lead=(3,))
    state = cl_optax.consolidate(state, PARAMS, output_grads=out_grads)
  B = _basis_rows(state)
  g = _tree(seed + 5, PARAMS)
  once = OGD_UPDATE(g, state, PARAMS)[0]
  twice = OGD_UPDATE(once, state, PARAMS)[0]
  norm = np.linalg.norm(_flat(g))
  assert np.max(np.abs(B @ _flat(once))) <= 1e-5 * norm
  np.testing.assert_allclose(_flat(twice), _flat(once), atol=1e-5 * norm)


@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**30))
def test_gpm_property_orthogonal_in_input_space_and_idempotent(seed):
  rng = np.random.default_rng(seed)
  state = GPM_TX.init(GPM_PARAMS)
  for _ in range(2):
    reps = {
      "dense": {"kernel": rng.normal(size=(10, 3)) @ rng.normal(size=(3, 8))},
      "conv": cl_optax.conv_representations(rng.normal(size=(2, 3, 4, 3)), (2, 2, 3, 4)),
    }
    state = cl_optax.consolidate(state, GPM_PARAMS, representations=reps)
  g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), GPM_PARAMS)
  once = GPM_UPDATE(g, state, GPM_PARAMS)[0]
  twice = GPM_UPDATE(once, state, GPM_PARAMS)[0]
  for path, d_in in ((("dense", "kernel"), 8), (("conv",), 12)):
    leaf = lambda t: functools.reduce(lambda x, k: x[k], path, t)  # noqa: E731
    count = int(leaf(state.feature_count))
    assert 0 < count <= d_in
    M = np.asarray(leaf(state.feature_basis))[:, :count]
    np.testing.assert_allclose(M.T @ M, np.eye(count), atol=1e-5)
    out = np.asarray(leaf(once)).reshape(d_in, -1)
    np.testing.assert_allclose(M.T @ out, 0.0, atol=1e-5)
    np.testing.assert_allclose(leaf(twice), leaf(once), atol=1e-5)
  np.testing.assert_array_equal(once["dense"]["bias"], 0.0)  # frozen after the first task


@pytest.mark.slow
def test_examples_run_end_to_end(monkeypatch):
  """The A-GEM / GEM example loops on a tiny permuted-digits stream."""
  import pathlib
  import sys

  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
  flax_agem = __import__("flax_agem")
  flax_gem = __import__("flax_gem")
  tasks = flax_agem.permuted_stream("digits", 2, 300, 100, seed=0)
  for method, make in [
    ("agem", lambda m, g, tx: flax_agem.make_agem_step(g, tx, ref_batch=16)),
    ("gem", lambda m, g, tx: flax_gem.make_gem_step(g, tx)),
  ]:
    acc = flax_agem.train(method, tasks, 0, make, mem_per_task=20, batch=10, lr=0.1)
    assert acc.shape == (2, 2) and np.all((acc >= 0) & (acc <= 1))
    assert acc[0, 0] > 0.5 and acc[1, 1] > 0.5  # 30 steps of 10 digits per task
  assert "flax_agem" in sys.modules


def sgp_reference(M, lam, X, thr, alpha):
  """sahagobinda/SGP update_SGP in float64: (basis, importances) after representation X [n, d]."""
  R = X.T
  scale = lambda v: (alpha + 1) * v / (alpha * v + v.max())  # noqa: E731
  if not M.shape[1]:
    U, S, _ = np.linalg.svd(R, full_matrices=False)
    r = int(np.sum(np.cumsum(S**2) / np.sum(S**2) < thr))
    return U[:, :r], scale(S[:r])
  Uc, Sc, _ = np.linalg.svd(M @ M.T @ R, full_matrices=False)
  old = np.sqrt(((M.T @ Uc) ** 2 * Sc**2).sum(1))
  U, S, _ = np.linalg.svd(R - M @ M.T @ R, full_matrices=False)
  total, acc, r = (R**2).sum(), (R**2).sum() - ((R - M @ M.T @ R) ** 2).sum(), 0
  while acc / total < thr and r < len(S):
    acc, r = acc + S[r] ** 2, r + 1
  new = scale(np.concatenate([old, S[:r]]))
  lam = np.concatenate([np.clip(lam + new[: len(lam)], 0, 1), new[len(lam) :]])
  return np.hstack([M, U[:, :r]]), lam


def test_sgp_matches_the_official_growth_importance_and_scaled_step():
  params = {"k": jnp.zeros((12, 5)), "b": jnp.zeros(5)}
  tx = cl_optax.sgp(0.9, alpha=3.0)
  state = tx.init(params)
  rng = np.random.default_rng(1)
  M, lam = np.zeros((12, 0)), np.zeros(0)
  for _ in range(2):
    X = rng.normal(size=(30, 4)) @ rng.normal(size=(4, 12)) + 0.05 * rng.normal(size=(30, 12))
    state = cl_optax.consolidate(state, params, representations={"k": X})
    M, lam = sgp_reference(M, lam, X, 0.9, 3.0)
    count = int(state.sgp_count["k"])
    assert count == M.shape[1] and 0 < count < 12, (count, M.shape)
    np.testing.assert_allclose(state.sgp_importance["k"][:count], lam, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(state.sgp_importance["k"][count:]) == 0)
  assert np.all(lam <= 1) and lam[0] == 1.0
  g = {"k": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), "b": jnp.ones(5)}
  out = jax.jit(tx.update)(g, state, params)[0]
  np.testing.assert_allclose(out["k"], g["k"] - M @ (lam[:, None] * (M.T @ g["k"])), atol=1e-4)
  np.testing.assert_array_equal(out["b"], 0.0)  # biases frozen after the first task
