"""Any pytree model: the same numbers on a plain dict, Flax NNX, Flax linen and Equinox.

One small MLP (4 -> 6 -> 3, biases) in four containers: a plain dict and Flax
(``kernel [in, out]``), Equinox (``weight [out, in]``). Every layer-structured
estimator and transform gives the reference (dict) result, up to the
transposition of Equinox's weights; the batch form and the model-structure
mistakes of issue 22 each get their message.
"""

import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import cl_optax
from cl_optax.importance import Batches, stack_batches

D_IN, HID, C, NB, B = 4, 6, 3, 3, 5


def _ref():
  k = jax.random.split(jax.random.key(0), 4)
  return {
    "l1": {"kernel": jax.random.normal(k[0], (D_IN, HID)), "bias": 0.1 * jnp.arange(HID * 1.0)},
    "l2": {"kernel": jax.random.normal(k[1], (HID, C)), "bias": -0.2 * jnp.arange(C * 1.0)},
  }


REF = _ref()
XS = jax.random.normal(jax.random.key(1), (NB, B, D_IN))
YS = jax.random.randint(jax.random.key(2), (NB, B), 0, C)
BATCHES = Batches(XS, YS)


def _mlp(w1, b1, w2, b2, x, taps, names):
  h = x @ w1 + b1 + (taps[names[0]] if taps else 0.0)
  a = jax.nn.relu(h)
  return a @ w2 + b2 + (taps[names[1]] if taps else 0.0), {names[0]: x, names[1]: a}


# ------------------------------------------------------------------ models
def dict_model():
  def fn(p, x, taps=None):
    return _mlp(p["l1"]["kernel"], p["l1"]["bias"], p["l2"]["kernel"], p["l2"]["bias"], x, taps,
                ("l1", "l2"))  # fmt: skip

  return REF, fn, ["l1", "l2"], lambda t: t, ("l1", "l2")


class _Nnx(nnx.Module):
  def __init__(self):
    self.l1 = nnx.Linear(D_IN, HID, rngs=nnx.Rngs(0))
    self.l2 = nnx.Linear(HID, C, rngs=nnx.Rngs(0))


def nnx_model():
  model = _Nnx()
  for name in ("l1", "l2"):
    getattr(model, name).kernel[...] = REF[name]["kernel"]
    getattr(model, name).bias[...] = REF[name]["bias"]
  params = nnx.state(model, nnx.Param)

  def fn(p, x, taps=None):
    return _mlp(p["l1"]["kernel"][...], p["l1"]["bias"][...], p["l2"]["kernel"][...],
                p["l2"]["bias"][...], x, taps, ("l1", "l2"))  # fmt: skip

  to_ref = lambda t: jax.tree.map(lambda v: v, nnx.to_pure_dict(t))  # noqa: E731
  return params, fn, ["l1", "l2"], to_ref, ("l1", "l2")


class _Linen(nn.Module):
  def setup(self):
    self.l1, self.l2 = nn.Dense(HID), nn.Dense(C)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def linen_model():
  params = {"params": REF}
  assert jax.tree.structure(_Linen().init(jax.random.key(0), XS[0])) == jax.tree.structure(params)

  def fn(p, x, taps=None):
    q = p["params"]
    return _mlp(q["l1"]["kernel"], q["l1"]["bias"], q["l2"]["kernel"], q["l2"]["bias"], x, taps,
                ("params/l1", "params/l2"))  # fmt: skip

  return params, fn, "params/*", lambda t: t["params"], ("params/l1", "params/l2")


def eqx_model():
  mlp = eqx.nn.MLP(D_IN, C, HID, depth=1, key=jax.random.key(0))
  mlp = eqx.tree_at(
    lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias),
    mlp,
    (REF["l1"]["kernel"].T, REF["l1"]["bias"], REF["l2"]["kernel"].T, REF["l2"]["bias"]),
  )
  params, static = eqx.partition(mlp, eqx.is_inexact_array)
  assert jnp.allclose(eqx.combine(params, static)(XS[0, 0]), dict_model()[1](REF, XS[0])[0][0])

  def fn(p, x, taps=None):
    l1, l2 = p.layers
    return _mlp(l1.weight.T, l1.bias, l2.weight.T, l2.bias, x, taps, ("layers/0", "layers/1"))

  def to_ref(t):
    l1, l2 = t.layers
    return {"l1": {"kernel": l1.weight.T, "bias": l1.bias},
            "l2": {"kernel": l2.weight.T, "bias": l2.bias}}  # fmt: skip

  return params, fn, "layers/*", to_ref, ("layers/0", "layers/1")


MODELS = {"dict": dict_model, "nnx": nnx_model, "linen": linen_model, "equinox": eqx_model}


def _frameworks(*names):
  """`names` as parameters; Linen and Equinox are `slow` (`make test-fast` runs the plain
  dict and Flax NNX forms, `make test` all four)."""
  return [
    pytest.param(n, marks=pytest.mark.slow) if n in ("linen", "equinox") else n for n in names
  ]


ALL_MODELS = _frameworks(*MODELS)


def _grads(params, fn):
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(fn(p, XS[0])[0], YS[0]).sum()  # noqa: E731
  return jax.grad(loss)(params)


def _close(got, want, **kw):
  chex.assert_trees_all_close(got, want, rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 1e-6))


# --------------------------------------------------- layer-structured ones
@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_kfac_factors_and_ncl_kfac_agree_across_models(name):
  params, fn, layers, to_ref, keys = MODELS[name]()
  _, ref_fn, ref_layers, _, ref_keys = dict_model()
  kf = cl_optax.importance.kfac_factors(fn, params, BATCHES, layers=layers, fisher="exact")
  ref = cl_optax.importance.kfac_factors(ref_fn, REF, BATCHES, layers=ref_layers, fisher="exact")
  assert sorted(kf) == sorted(keys)
  for k, rk in zip(keys, ref_keys, strict=True):
    _close(kf[k], ref[rk])
  tx = cl_optax.ncl(10.0, damping=0.1, precision="kfac", layers=layers)
  state = cl_optax.consolidate(tx.init(params), params, precision=kf)
  ref_tx = cl_optax.ncl(10.0, damping=0.1, precision="kfac", layers=ref_layers)
  ref_state = cl_optax.consolidate(ref_tx.init(REF), REF, precision=ref)
  upd = tx.update(_grads(params, fn), state, params)[0]
  ref_upd = ref_tx.update(_grads(REF, ref_fn), ref_state, REF)[0]
  _close(to_ref(upd), ref_upd)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_gpm_agrees_across_models(name):
  params, fn, layers, to_ref, keys = MODELS[name]()
  _, ref_fn, _, _, _ = dict_model()
  inputs = fn(params, XS[0])[1]
  kernels = {"dict": "kernel", "nnx": "kernel", "linen": "kernel", "equinox": "weight"}[name]
  reps = {f"{k}/{kernels}": inputs[k][:3] for k in keys}  # /-joined paths name the kernels
  tx = cl_optax.gpm(threshold=0.9, layers=layers)
  state = cl_optax.consolidate(tx.init(params), params, representations=reps)
  ref_tx = cl_optax.gpm(threshold=0.9, layers=["l1/kernel", "l2/kernel"])
  ref_reps = {"l1": {"kernel": inputs[keys[0]][:3]}, "l2": {"kernel": inputs[keys[1]][:3]}}
  ref_state = cl_optax.consolidate(ref_tx.init(REF), REF, representations=ref_reps)
  upd = tx.update(_grads(params, fn), state)[0]
  _close(to_ref(upd), ref_tx.update(_grads(REF, ref_fn), ref_state)[0])


@pytest.mark.parametrize("name", _frameworks("equinox", "linen"))
def test_ogd_and_output_gradients_agree_across_models(name):
  params, fn, _, to_ref, _ = MODELS[name]()
  _, ref_fn, _, _, _ = dict_model()
  x, y = XS[0], YS[0]
  og = cl_optax.importance.output_gradients(lambda p, v: fn(p, v)[0], params, x, y)
  ref_og = cl_optax.importance.output_gradients(lambda p, v: ref_fn(p, v)[0], REF, x, y)
  tx, ref_tx = cl_optax.ogd(8), cl_optax.ogd(8)
  state = cl_optax.consolidate(tx.init(params), params, output_grads=og)
  ref_state = cl_optax.consolidate(ref_tx.init(REF), REF, output_grads=ref_og)
  upd = tx.update(_grads(params, fn), state)[0]
  _close(to_ref(upd), ref_tx.update(_grads(REF, ref_fn), ref_state)[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", _frameworks("equinox", "linen", "nnx"))
def test_spg_and_soft_mask_heads_agree_across_models(name):
  params, fn, _, to_ref, keys = MODELS[name]()
  _, ref_fn, _, _, _ = dict_model()
  logits = lambda f: lambda p, x, head: f(p, x)[0] + head  # noqa: E731
  imp = cl_optax.importance.spg(logits(fn), params, BATCHES, task=1)
  ref_imp = cl_optax.importance.spg(logits(ref_fn), REF, BATCHES, task=1)
  _close(to_ref(imp), ref_imp)
  tx = cl_optax.soft_mask(head=keys[1])  # the last layer is the head, by its path
  ref_tx = cl_optax.soft_mask(head="l2")
  state = cl_optax.consolidate(tx.init(params), params, importance=imp)
  ref_state = cl_optax.consolidate(ref_tx.init(REF), REF, importance=ref_imp)
  upd = tx.update(_grads(params, fn), state)[0]
  _close(to_ref(upd), ref_tx.update(_grads(REF, ref_fn), ref_state)[0])


def test_das_units_and_param_importance_on_equinox():
  params, _, _, to_ref, _ = eqx_model()
  imp = jnp.linspace(0.0, 1.0, HID)
  got = cl_optax.importance.das_param_importance(params, {"layers/0": ("units", imp)})
  want = cl_optax.importance.das_param_importance(REF, {"l1": ("units", imp)})
  full = lambda t, p: jax.tree.map(lambda i, x: jnp.broadcast_to(i, x.shape), t, p)  # noqa: E731
  _close(to_ref(full(got, params)), full(want, REF))

  def gated(p, gates, x, key):  # das_units needs no layer structure: gates are the user's
    l1, l2 = p.layers
    return jax.nn.relu(x @ l1.weight.T + l1.bias) * gates["units"] @ l2.weight.T

  units = cl_optax.importance.das_units(
    gated, params, {"units": jnp.ones(HID)}, Batches(XS), key=jax.random.key(0)
  )
  assert units["units"].shape == (HID,)


def test_selector_forms_select_the_same_layers():
  params, fn, _, _, _ = eqx_model()
  forms = ["layers/*", ["layers/0", "layers/1"], re.compile(r"layers/\d+"),
           lambda path, leaf: path.endswith("weight")]  # fmt: skip
  got = [cl_optax.importance.kfac_factors(fn, params, BATCHES, layers=s, fisher="exact")
         for s in forms]  # fmt: skip
  for g in got[1:]:
    _close(g, got[0])


# ------------------------------------------------------ one jitted scan
@pytest.mark.parametrize("nb", [2, 6])
def test_estimators_trace_the_model_a_fixed_number_of_times(nb):
  """Batches are scanned: the model is traced the same number of times for 2 or 6 batches."""
  xs = jax.random.normal(jax.random.key(nb), (nb, B, D_IN))
  ys = jnp.zeros((nb, B), jnp.int32)

  @chex.assert_max_traces(n=2)  # the scan's shape probe and its body
  def logits(p, x):
    return dict_model()[1](p, x)[0]

  cl_optax.importance.mas_sensitivity(logits, REF, Batches(xs))
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=2)
  def logits2(p, x):
    return dict_model()[1](p, x)[0]

  cl_optax.importance.fisher_diag(logits2, REF, Batches(xs, ys))
  chex.clear_trace_counter()

  # the width check, then a forward and a backward pass in the scan's shape probe and body
  @chex.assert_max_traces(n=5)
  def tapped(p, x, taps):
    return dict_model()[1](p, x, taps)

  cl_optax.importance.kfac_factors(tapped, REF, Batches(xs, ys), layers="l*", key=jax.random.key(0))
  chex.clear_trace_counter()


# --------------------------------------------------- mistakes and messages
_FORM = re.escape("expected cl_optax.importance.Batches(x, y)")
_X, _Y = XS[0], YS[0]


def _fisher(batches):
  return cl_optax.importance.fisher_diag(lambda p, x: dict_model()[1](p, x)[0], REF, batches)


def _spg(batches):
  return cl_optax.importance.spg(lambda p, x, h: dict_model()[1](p, x)[0], REF, batches, task=0)


_TOKENS = [jnp.array([[1, 2], [3, 4]]), jnp.array([[5, 6], [0, 1]])]
_EMB = {"e": jnp.ones((7, 3))}


def _mas_tokens(batches):
  return cl_optax.importance.mas_sensitivity(lambda p, t: p["e"][t].sum(1), _EMB, batches)


BATCH_MISTAKES = {
  "a single unstacked batch (x, y)": (
    lambda: _fisher((_X, _Y)),
    r"fisher_diag: `batches` is a tuple of 2 elements; " + _FORM,
  ),
  "a single batch wrapped but not stacked": (
    lambda: _fisher(Batches(_X, _Y)),
    r"fisher_diag: `batches.y` has shape \(5,\); it needs two leading axes "
    r"\[num_batches, batch\] \(a single batch is Batches\(x\[None\], y\[None\]\)\)",
  ),
  "an unzipped pair of lists ([xs...], [ys...])": (
    lambda: _fisher((list(XS), list(YS))),
    r"fisher_diag: `batches` is a tuple of 2 elements; .*stack_batches\(pairs\)",
  ),
  "stacked arrays with different batch counts": (
    lambda: _fisher(Batches(XS, YS[:2])),
    r"fisher_diag: the leaves of `batches` disagree on \[num_batches, batch\] "
    r"\(batches.x: 3 batches of 5, batches.y: 2 batches of 5\)",
  ),
  "spg given an unstacked batch": (
    lambda: _spg((_X, _Y)),
    r"spg: `batches` is a tuple of 2 elements; " + _FORM,
  ),
  "spg given an unstacked batch in Batches": (
    lambda: _spg(Batches(_X, _Y)),
    r"spg: `batches.y` has shape \(5,\)",
  ),
  "token batches for mas as a list": (
    lambda: _mas_tokens(_TOKENS),
    r"mas_sensitivity: `batches` is a list of 2 elements; " + _FORM,
  ),
  "stack_batches of ragged batches": (
    lambda: stack_batches([(XS[0], YS[0]), (XS[1][:2], YS[1][:2])]),
    r"stack_batches: batches differ in shape \(ragged\): batch sizes \[5, 2\]",
  ),
  "stack_batches of bare arrays": (
    lambda: stack_batches([XS[0]]),
    r"stack_batches: item 0 is an array of shape \(5, 4\); expected an \(x, y\) pair",
  ),
  "labels missing for the empirical Fisher": (
    lambda: _fisher(Batches(XS)),
    r"fisher_diag: needs labels; got Batches with y=None",
  ),
}


@pytest.mark.parametrize("name", BATCH_MISTAKES)
def test_batch_form_mistakes_are_named(name):
  thunk, message = BATCH_MISTAKES[name]
  with pytest.raises(ValueError, match=message):
    thunk()


def test_token_batches_for_mas():
  got = _mas_tokens(Batches(jnp.stack(_TOKENS)))
  one = [_mas_tokens(Batches(t[None])) for t in _TOKENS]
  _close(got, jax.tree.map(lambda a, b: (a + b) / 2, *one))


def test_stack_batches():
  _close(stack_batches(zip(XS, YS, strict=True)), BATCHES)
  _close(stack_batches((x, None) for x in XS), Batches(XS))


def _eqx_kfac(**kw):
  params, fn, _, _, _ = eqx_model()
  return cl_optax.importance.kfac_factors(fn, params, BATCHES, fisher="exact", **kw)


_SQUARE = {"lin": {"weight": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
_CONV = {"conv": {"weight": jnp.ones((8, 3, 3, 3))}}
_SQ = re.escape("layer 'lin' has a square weight (4, 4), so its orientation cannot be told")
MODEL_MISTAKES = {
  "a Flax layer name on an Equinox model": (
    lambda: _eqx_kfac(layers=["l1"]),
    re.escape(
      "kfac_factors: the layer selector ['l1'] selects no dense layer; layers found (paths "
      "of nodes with a kernel / weight): ['layers/0', 'layers/1']"
    ),
  ),
  "the wrong orientation declared": (
    lambda: _eqx_kfac(layers="layers/*", orientation="in_out"),
    re.escape(
      "kfac_factors: fn(params, x, taps) failed with taps [batch, out] for the layers "
      "{'layers/0': ('in_out', (6, 4)), 'layers/1': ('in_out', (3, 6))} (orientation, "
      "stored kernel shape): "
    ),
  ),
  "a square weight without orientation (ncl)": (
    lambda: cl_optax.ncl(1.0, precision="kfac", layers="lin").init(_SQUARE),
    "ncl: " + _SQ,
  ),
  "a square weight without orientation (gpm)": (
    lambda: cl_optax.gpm().init(_SQUARE),
    "gpm: " + _SQ,
  ),
  "a conv weight selected for K-FAC": (
    lambda: cl_optax.ncl(1.0, precision="kfac", layers="conv").init(_CONV),
    re.escape("ncl: selected layer 'conv' has a 4-D weight of shape (8, 3, 3, 3)"),
  ),
  "a PyTorch-layout conv weight for gpm": (
    lambda: cl_optax.gpm().init(_CONV),
    re.escape("gpm: leaf 'conv/weight' of shape (8, 3, 3, 3) is read as an [out, in, ...]"),
  ),
  "a gpm selector that selects nothing": (
    lambda: cl_optax.gpm(layers="head").init(REF),
    re.escape("gpm: the selector 'head' selects no leaf with 2 or more axes; parameter paths"),
  ),
}


@pytest.mark.parametrize("name", MODEL_MISTAKES)
def test_model_structure_mistakes_are_named(name):
  thunk, message = MODEL_MISTAKES[name]
  with pytest.raises(ValueError, match=message):
    thunk()
