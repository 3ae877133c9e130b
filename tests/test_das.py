"""DAS: unit-level soft_mask, gate importance, parameter mapping, contrastive loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cl_optax
from cl_optax.importance import (
  das_normalize,
  das_param_importance,
  das_units,
  stack_batches,
)

SETTINGS = settings(deadline=None, max_examples=15)

# -------------------------------------------------------- unit-level soft_mask
PARAMS = {
  "attn_out": jnp.ones((2, 3, 4)),  # [heads, head_dim, features]
  "dense": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)},
  "ln": jnp.ones(4),
  "head": jnp.ones((5, 2)),
}
UNIT_SHAPES = {
  "attn_out": (2, 1, 1),
  "dense": {"kernel": (5,), "bias": (5,)},
  "ln": (),
  "head": None,  # full shape (a head leaf below, so not kept)
}
LEAVES, TREEDEF = jax.tree.flatten(PARAMS)
unit = st.floats(0, 1, width=32, allow_subnormal=False)
finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


def _unit_tree(draw_shapes):
  shapes = jax.tree.leaves(draw_shapes, is_leaf=lambda x: isinstance(x, tuple) or x is None)
  shapes = [s if s is not None else p.shape for s, p in zip(shapes, LEAVES)]
  return st.tuples(*[hnp.arrays(np.float32, s, elements=unit) for s in shapes]).map(
    lambda leaves: jax.tree.unflatten(TREEDEF, leaves)
  )


grads_st = st.tuples(*[hnp.arrays(np.float32, p.shape, elements=finite) for p in LEAVES]).map(
  lambda leaves: jax.tree.unflatten(TREEDEF, leaves)
)


@pytest.mark.slow
@SETTINGS
@given(grads_st, st.lists(_unit_tree(UNIT_SHAPES), min_size=1, max_size=2), st.booleans())
def test_broadcast_mask_equals_explicit_mask(grads, importances, with_head):
  head = {k: k == "head" for k in PARAMS} if with_head else None
  unit_tx = cl_optax.soft_mask(head=head, importance_shapes=UNIT_SHAPES)
  full_tx = cl_optax.soft_mask(head=head)
  unit_state, full_state = unit_tx.init(PARAMS), full_tx.init(PARAMS)
  for imp in importances:
    full_imp = jax.tree.map(lambda i, p: jnp.broadcast_to(i, p.shape), imp, PARAMS)
    unit_state = cl_optax.consolidate(unit_state, PARAMS, importance=imp)
    full_state = cl_optax.consolidate(full_state, PARAMS, importance=full_imp)
  assert unit_state.importance["attn_out"].shape == (2, 1, 1)
  got, _ = unit_tx.update(grads, unit_state, PARAMS)
  want, _ = full_tx.update(grads, full_state, PARAMS)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(unit_state.head_scale, full_state.head_scale, rtol=1e-6)


def test_importance_shapes_callable_and_arrays():
  via_fn = cl_optax.soft_mask(importance_shapes=lambda p: UNIT_SHAPES).init(PARAMS)
  arrays = jax.tree.map(
    lambda s, p: jnp.zeros(p.shape if s is None else s),
    UNIT_SHAPES,
    PARAMS,
    is_leaf=lambda x: isinstance(x, tuple) or x is None,
  )
  via_arrays = cl_optax.soft_mask(importance_shapes=arrays).init(PARAMS)
  chex.assert_trees_all_equal_shapes(via_fn, via_arrays)
  assert via_fn.importance["dense"]["kernel"].shape == (5,)
  assert via_fn.importance["head"].shape == (5, 2)


def test_importance_shapes_errors():
  bad = dict(UNIT_SHAPES, attn_out=(3, 1, 1))
  with pytest.raises(ValueError, match=r"\['attn_out'\] is \(3, 1, 1\); expected a shape "):
    cl_optax.soft_mask(importance_shapes=bad).init(PARAMS)
  with pytest.raises(ValueError, match="must be a tree like params"):
    cl_optax.soft_mask(importance_shapes={"attn_out": (2, 1, 1)}).init(PARAMS)
  state = cl_optax.soft_mask(importance_shapes=UNIT_SHAPES).init(PARAMS)
  full = jax.tree.map(lambda p: jnp.zeros(p.shape), PARAMS)
  with pytest.raises(
    ValueError, match=r"\['attn_out'\] has shape \(2, 3, 4\); expected \(2, 1, 1\)"
  ):
    cl_optax.consolidate(state, PARAMS, importance=full)


@pytest.mark.slow
class UnitJitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_same_with_and_without_jit(self):
    tx = optax.chain(optax.adam(0.1), cl_optax.soft_mask(importance_shapes=UNIT_SHAPES))
    imp = jax.tree.map(
      lambda s, p: jnp.full(p.shape if s is None else s, 0.3),
      UNIT_SHAPES,
      PARAMS,
      is_leaf=lambda x: isinstance(x, tuple) or x is None,
    )
    imp["attn_out"] = jnp.array([1.0, 0.2]).reshape(2, 1, 1)
    state = cl_optax.consolidate(tx.init(PARAMS), PARAMS, importance=imp)
    grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), PARAMS)
    got, _ = self.variant(tx.update)(grads, state, PARAMS)
    with jax.disable_jit():  # the reference: every op and branch run in Python
      want, _ = tx.update(grads, state, PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["attn_out"][0], 0.0)


# ------------------------------------------------------------- normalisation
@SETTINGS
@given(hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32)))
def test_das_normalize_matches_numpy(raw):
  got = das_normalize({"a": raw, "b": raw[0]}, stacked=False)
  stacked = das_normalize({"a": raw}, stacked=True)["a"]

  def ref(x):  # official impt_norm: per layer, torch's unbiased std, then |tanh|
    x = x.astype(np.float64)
    std = x.std(ddof=1)
    return np.zeros_like(x) if std == 0 else np.abs(np.tanh((x - x.mean()) / std))

  np.testing.assert_allclose(got["a"], ref(raw), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["b"], ref(raw[0]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stacked, np.stack([ref(r) for r in raw]), rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(stacked)) and stacked.min() >= 0 and stacked.max() <= 1


# ----------------------------------------------------------- gate gradients
D, H, HD, F, T, V = 6, 2, 3, 5, 4, 7


def _tiny_params():
  k = jax.random.split(jax.random.key(3), 6)
  return {
    "emb": jax.random.normal(k[0], (V, D)),
    "qkv": jax.random.normal(k[1], (3, D, H, HD)) / np.sqrt(D),
    "out": jax.random.normal(k[2], (H, HD, D)) / np.sqrt(HD),
    "up": jax.random.normal(k[3], (D, F)) / np.sqrt(D),
    "down": jax.random.normal(k[4], (F, D)) / np.sqrt(F),
    "lm": jax.random.normal(k[5], (D, V)) / np.sqrt(D),
  }


def _tiny_model(params, gates, tokens, key, rate=0.2):
  """One-layer transformer: gates on heads and FFN units; dropout from `key`."""
  x = params["emb"][tokens]
  q, k, v = (jnp.einsum("btd,dhe->bthe", x, w) for w in params["qkv"])
  att = jax.nn.softmax(jnp.einsum("bthe,bshe->bhts", q, k) / np.sqrt(HD), -1)
  keep = jax.random.bernoulli(key, 1 - rate, att.shape)
  att = jnp.where(keep, att / (1 - rate), 0.0)
  heads = jnp.einsum("bhts,bshe->bthe", att, v) * gates["heads"][:, None]
  x = x + jnp.einsum("bthe,hed->btd", heads, params["out"])
  x = x + jax.nn.gelu((x @ params["up"]) * gates["ffn"]) @ params["down"]
  return x


def _lm_loss(hidden, batch):
  logits = hidden @ _TINY["lm"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


_TINY = _tiny_params()
GATES = {"heads": jnp.ones(H), "ffn": jnp.ones(F)}


def _batch_list(n=2):
  rng = np.random.default_rng(0)
  return [{"x": rng.integers(0, V, (3, T)), "y": rng.integers(0, V, (3, T))} for _ in range(n)]


def _batches(n=2):
  """The batches of ``_batch_list`` stacked: ``fn`` gets each batch's dict (``y`` is None)."""
  return stack_batches((b, None) for b in _batch_list(n))


def _fn(params, gates, batch, key):
  return _tiny_model(params, gates, batch["x"], key)


def _finite_difference(objective, gates, eps=1e-2):
  out = {}
  for name, g in gates.items():
    d = np.zeros(g.shape, np.float64)
    for i in range(g.size):
      e = jnp.zeros(g.size).at[i].set(eps).reshape(g.shape)
      plus = dict(gates, **{name: g + e})
      minus = dict(gates, **{name: g - e})
      d.flat[i] = (float(objective(plus)) - float(objective(minus))) / (2 * eps)
    out[name] = d
  return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["own", "proxy_kl"])
def test_gate_importance_matches_finite_differences(loss):
  key = jax.random.key(11)
  pairs, batches = _batch_list(), _batches()
  n_tokens = sum(b["x"].size for b in pairs)

  def objective(gates):  # sum over batches of the batch loss, over the tokens
    total = 0.0
    for i, b in enumerate(pairs):
      k = jax.random.fold_in(key, i)
      if loss == "own":
        total += _lm_loss(_fn(_TINY, gates, b, k), b)
      else:
        ks, kt = jax.random.split(k)
        s, t = _fn(_TINY, gates, b, ks), _fn(_TINY, gates, b, kt)
        ls, lt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
        total += jnp.sum(jnp.exp(lt) * (lt - ls)) / s.shape[0]
    return total / n_tokens

  kwargs = {"loss": _lm_loss} if loss == "own" else {}
  raw = das_units(_fn, _TINY, GATES, batches, key=key, normalize=False, **kwargs)
  fd = _finite_difference(jax.jit(objective), GATES)
  for name in GATES:
    np.testing.assert_allclose(raw[name], fd[name], rtol=2e-2, atol=2e-5 * np.abs(fd[name]).max())
    assert np.abs(fd[name]).max() > 0  # the test can fail: a nonzero signal
  norm = das_units(_fn, _TINY, GATES, batches, key=key, **kwargs)
  chex.assert_trees_all_close(norm, das_normalize(raw), rtol=1e-5, atol=1e-6)


def test_das_units_bad_input():
  with pytest.raises(ValueError, match="needs `key=`"):
    das_units(_fn, _TINY, GATES, _batches())
  with pytest.raises(ValueError, match="`loss` must be 'proxy_kl' or a callable"):
    das_units(_fn, _TINY, GATES, _batches(), key=jax.random.key(0), loss="mlm")
  with pytest.raises(ValueError, match="`batches` is empty"):
    empty = jax.tree.map(lambda v: v[:0], _batches())
    das_units(_fn, _TINY, GATES, empty, key=jax.random.key(0))


# ------------------------------------------------ mapping onto Flax parameters
class Block(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(
      num_heads=H, in_features=D, qkv_features=H * HD, decode=False, rngs=rngs
    )
    self.up = nnx.Linear(D, F, rngs=rngs)
    self.ln = nnx.LayerNorm(D, rngs=rngs)


def test_param_importance_shapes_for_flax_layers():
  params = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
  imp = das_param_importance(
    params, {"attn": ("heads", jnp.array([0.25, 1.0])), "up": ("units", jnp.arange(F) / F)}
  )
  assert imp["attn"]["query"]["kernel"].shape == (1, H, 1)
  assert imp["attn"]["value"]["bias"].shape == (H, 1)
  assert imp["attn"]["out"]["kernel"].shape == (H, 1, 1)
  assert imp["attn"]["out"]["bias"].shape == ()
  assert imp["up"]["kernel"].shape == (F,) and imp["up"]["bias"].shape == (F,)
  assert imp["ln"]["scale"].shape == ()
  with pytest.raises(ValueError, match="no parameters under"):
    das_param_importance(params, {"mlp": ("units", jnp.ones(F))})
  with pytest.raises(ValueError, match="has 3 head importances"):
    das_param_importance(params, {"attn": ("heads", jnp.ones(3))})
  with pytest.raises(ValueError, match="has 4 unit importances"):
    das_param_importance(params, {"up": ("units", jnp.ones(4))})


@pytest.mark.slow
def test_head_importance_one_freezes_every_parameter_of_that_head():
  model = Block(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  units = {"attn": ("heads", jnp.array([1.0, 0.0])), "up": ("units", jnp.zeros(F))}
  imp = das_param_importance(params, units)
  tx = optax.chain(optax.adam(0.1), cl_optax.soft_mask(importance_shapes=imp))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  cl_optax.consolidate(optimizer, params, importance=imp)
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))

  def loss_fn(model):
    x = jnp.linspace(-1, 1, 2 * T * D).reshape(2, T, D)
    return jnp.sum(model.up(model.attn(model.ln(x))) ** 2)

  nnx.jit(lambda m, o: o.update(m, nnx.grad(loss_fn)(m)))(model, optimizer)
  after = nnx.state(model, nnx.Param)
  a, b = after["attn"], before["attn"]
  for name in ("query", "key", "value"):
    np.testing.assert_array_equal(a[name]["kernel"][...][:, 0], b[name]["kernel"][...][:, 0])
    np.testing.assert_array_equal(a[name]["bias"][...][0], b[name]["bias"][...][0])
    assert np.abs(a[name]["kernel"][...][:, 1] - b[name]["kernel"][...][:, 1]).max() > 0
  np.testing.assert_array_equal(a["out"]["kernel"][...][0], b["out"]["kernel"][...][0])
  assert np.abs(a["out"]["kernel"][...][1] - b["out"]["kernel"][...][1]).max() > 0


# ------------------------------------------------------------- contrastive
def _contrastive_reference(a, p, n, tau):
  def cos(x, y):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-8)
    return x @ y.T

  logits = cos(a, p) if n is None else np.concatenate([cos(a, p), cos(a, n)], 1)
  logits = logits.astype(np.float64) / tau
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -np.mean(np.diag(logp[:, : len(a)]))


@SETTINGS
@given(
  hnp.arrays(np.float32, (3, 3, 4), elements=st.floats(-3, 3, width=32)),
  st.booleans(),
  st.sampled_from([0.05, 0.5]),
)
def test_das_contrastive_matches_numpy(z, with_negative, tau):
  a, p, n = z
  n = n if with_negative else None
  got = cl_optax.losses.das_contrastive(a, p, n, temperature=tau)
  np.testing.assert_allclose(got, _contrastive_reference(a, p, n, tau), rtol=2e-4, atol=2e-4)


def test_das_contrastive_shapes_checked():
  with pytest.raises(ValueError, match=r"must both be \[batch, features\]"):
    cl_optax.losses.das_contrastive(jnp.ones((2, 3)), jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"`negative` must be \[n, 3\]"):
    cl_optax.losses.das_contrastive(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 4)))


@pytest.mark.slow
def test_tokens_scale_only_the_raw_importance():
  key, batches = jax.random.key(2), _batches()
  raw = das_units(_fn, _TINY, GATES, batches, key=key, normalize=False)
  raw_one = das_units(_fn, _TINY, GATES, batches, key=key, normalize=False, tokens=lambda b: 1.0)
  n_tokens = sum(b["x"].size for b in _batch_list())
  chex.assert_trees_all_close(
    raw_one, jax.tree.map(lambda x: x * n_tokens / len(_batch_list()), raw), rtol=1e-5
  )
  chex.assert_trees_all_close(das_normalize(raw_one), das_normalize(raw), rtol=1e-4, atol=1e-5)
