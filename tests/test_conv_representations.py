"""conv_representations: a convolution's input patches in its kernel's own feature order,
and gpm on convolution kernels (it takes only those patches, built for that kernel)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cl_optax

DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _reference_patches(x, window, strides, pads, dilation):
  """Explicit loops: for every example and output position, the window's entries in
  (window..., c_in) order, zero outside the input."""
  n, *spatial, c = x.shape
  out = [
    (s + lo + hi - ((k - 1) * d + 1)) // st + 1
    for s, (lo, hi), k, d, st in zip(spatial, pads, window, dilation, strides)
  ]
  rows = []
  for b in range(n):
    for pos in itertools.product(*(range(o) for o in out)):
      row = []
      for off in itertools.product(*(range(k) for k in window)):
        idx = [
          p * st - lo + o * d for p, st, (lo, _), o, d in zip(pos, strides, pads, off, dilation)
        ]
        inside = all(0 <= i < s for i, s in zip(idx, spatial))
        for ch in range(c):
          row.append(x[(b, *idx, ch)] if inside else 0.0)
      rows.append(row)
  return np.asarray(rows, np.float64).reshape(len(rows), -1)


CASES = [  # (kernel shape, input spatial, strides, padding, dilation)
  ((3, 3, 2, 4), (5, 5), 1, "SAME", 1),
  ((3, 3, 2, 4), (6, 5), 2, "SAME", 1),
  ((3, 2, 3, 2), (7, 6), (2, 1), "VALID", (1, 2)),
  ((3, 3, 2, 3), (6, 7), 2, ((1, 0), (2, 1)), 1),
  ((2, 2, 1, 2), (4, 4), 1, 1, 2),
  ((5, 5, 1, 2), (5, 5), 1, "SAME", 1),
  ((3, 2, 4), (9,), 2, "SAME", 2),  # 1-D
  ((2, 2, 2, 2, 3), (4, 3, 4), 1, "SAME", 1),  # 3-D
]


def _conv_args(kernel_shape, strides, padding, dilation):
  n = len(kernel_shape) - 2
  tup = lambda v: (v,) * n if isinstance(v, int) else tuple(v)  # noqa: E731
  if isinstance(padding, int):
    padding = [(padding, padding)] * n
  return tup(strides), padding, tup(dilation)


@pytest.mark.parametrize("kernel_shape, spatial, strides, padding, dilation", CASES)
def test_patches_match_explicit_loops_and_conv(kernel_shape, spatial, strides, padding, dilation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *spatial, kernel_shape[-2])).astype(np.float32)
  kernel = rng.normal(size=kernel_shape).astype(np.float32)
  reps = cl_optax.conv_representations(
    x, kernel_shape, strides=strides, padding=padding, dilation=dilation
  )
  assert isinstance(reps, cl_optax.ConvRepresentations)
  assert reps.kernel_shape == kernel_shape
  st, pad, dil = _conv_args(kernel_shape, strides, padding, dilation)
  n = len(kernel_shape) - 2
  if isinstance(pad, str):
    span = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:n], dil)]
    pads = jax.lax.padtype_to_pads(spatial, span, st, pad)
  else:
    pads = pad
  want = _reference_patches(x, kernel_shape[:n], st, pads, dil)
  np.testing.assert_allclose(reps.patches, want, atol=1e-6)
  # The ordering proof: conv(x, k) flattened == patches @ k.reshape(-1, c_out).
  y = jax.lax.conv_general_dilated(
    x, kernel, st, pad, rhs_dilation=dil, dimension_numbers=DIMS[n], precision="highest"
  )
  c_out = kernel_shape[-1]
  np.testing.assert_allclose(
    np.asarray(reps.patches, np.float64) @ kernel.reshape(-1, c_out).astype(np.float64),
    np.asarray(y).reshape(-1, c_out),
    atol=1e-4,
  )


def test_patches_of_a_flax_nnx_conv_give_its_output():
  """nnx.Conv stores its kernel (kh, kw, c_in, c_out): the patches of its inputs times the
  flattened kernel, plus the bias, are its outputs."""
  from flax import nnx

  conv = nnx.Conv(3, 5, (3, 2), strides=(2, 1), kernel_dilation=(1, 2), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 8, 3))
  reps = cl_optax.conv_representations(
    x, conv.kernel.shape, strides=(2, 1), padding="SAME", dilation=(1, 2)
  )
  kernel = conv.kernel.get_value()
  out = reps.patches @ kernel.reshape(-1, 5) + conv.bias.get_value()
  np.testing.assert_allclose(out, conv(x).reshape(-1, 5), atol=1e-4)


def test_runs_under_jit_and_keeps_the_kernel_shape_static():
  f = jax.jit(lambda x: cl_optax.conv_representations(x, (3, 3, 2, 4), strides=2))
  x = jnp.arange(2 * 5 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 5, 2)
  reps = f(x)
  assert reps.kernel_shape == (3, 3, 2, 4)
  np.testing.assert_array_equal(
    reps.patches, cl_optax.conv_representations(x, (3, 3, 2, 4), strides=2).patches
  )
  leaves, treedef = jax.tree.flatten(reps)
  assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves) == reps


@pytest.mark.parametrize(
  "x_shape, kernel_shape, kwargs, match",
  [
    ((2, 5, 5, 6), (3, 3, 2, 4), {}, r"6 input channels.*grouped convolution"),
    ((2, 5, 5, 3), (3, 3, 2, 4), {}, r"3 input channels.*channels-last"),
    ((2, 5, 5), (3, 3, 2, 4), {}, r"\[n, \*spatial, c_in\] with 2 spatial axes"),
    ((2, 5, 5, 2), (3, 2), {}, r"full shape \(\*window, c_in, c_out\)"),
    ((2, 5, 5, 2), (3, 3, 2, 4), {"padding": "CIRCULAR"}, r"'CIRCULAR' is not supported"),
    ((2, 5, 5, 2), (3, 3, 2, 4), {"padding": [(1, 1)]}, r"2 \(low, high\) pairs"),
    ((2, 5, 5, 2), (3, 3, 2, 4), {"strides": 0}, r"`strides` must be"),
    ((2, 5, 5, 2), (3, 3, 2, 4), {"dilation": (1, 2, 3)}, r"`dilation` must be"),
    ((2, 2, 2, 2), (3, 3, 2, 4), {"padding": "VALID"}, r"does not fit"),
  ],
)
def test_bad_inputs_are_refused(x_shape, kernel_shape, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cl_optax.conv_representations(jnp.ones(x_shape), kernel_shape, **kwargs)


# ------------------------------------------------------------------ gpm on convolutions

KERNEL = (3, 3, 3, 4)  # d_in = 27
PARAMS = {"conv": {"kernel": jnp.zeros(KERNEL), "bias": jnp.zeros(4)}, "dense": jnp.zeros((6, 2))}


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=DIMS[2], precision="highest"
  )


def _seen_and_new_inputs():
  """Two seen images (18 patches: a subspace of the 27 input directions) and new images that
  are linear combinations of them, so every new patch lies in the span of the seen ones."""
  rng = np.random.default_rng(3)
  seen = jnp.asarray(rng.normal(size=(2, 3, 3, 3)), jnp.float32)
  coef = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)
  return seen, jnp.einsum("bs,shwc->bhwc", coef, seen)


def _kernel_grad(x_new):
  """The gradient of a regression loss w.r.t. the kernel, from the new images."""
  target = jax.random.normal(jax.random.key(4), (5, 3, 3, 4))
  kernel = jax.random.normal(jax.random.key(5), KERNEL)
  return jax.grad(lambda k: jnp.sum(jnp.square(_conv(x_new, k) - target)))(kernel)


def _passed_fraction(reps):
  tx = cl_optax.gpm(threshold=1.0)
  state = cl_optax.consolidate(
    tx.init(PARAMS), PARAMS, representations={"conv": {"kernel": reps}, "dense": jnp.eye(6)[:2]}
  )
  seen, new = _seen_and_new_inputs()
  del seen
  g = _kernel_grad(new)
  grads = {"conv": {"kernel": g, "bias": jnp.ones(4)}, "dense": jnp.ones((6, 2))}
  out = jax.jit(tx.update)(grads, state, PARAMS)[0]["conv"]["kernel"]
  return float(jnp.linalg.norm(out) / jnp.linalg.norm(g)), int(
    state.feature_count["conv"]["kernel"]
  )


@pytest.mark.slow
def test_gpm_removes_a_gradient_built_from_seen_inputs_entirely():
  seen, _ = _seen_and_new_inputs()
  reps = cl_optax.conv_representations(seen, KERNEL, padding="SAME")
  assert reps.patches.shape == (18, 27)
  passed, count = _passed_fraction(reps)
  assert 0 < count < 27  # a proper subspace: the test can tell orders apart
  assert passed < 1e-5, passed


@pytest.mark.slow
def test_patches_in_the_wrong_order_would_protect_the_wrong_subspace():
  """Why gpm refuses a plain array at a conv kernel: conv_general_dilated_patches orders a
  patch (c_in, kh, kw); a basis grown from those has the right width and lets most of the
  gradient through. (Wrapping them by hand is the only way past the check.)"""
  seen, _ = _seen_and_new_inputs()
  wrong = jax.lax.conv_general_dilated_patches(
    seen, (3, 3), (1, 1), "SAME", dimension_numbers=DIMS[2]
  ).reshape(-1, 27)
  right = cl_optax.conv_representations(seen, KERNEL)
  np.testing.assert_allclose(  # the same entries, in another order
    np.sort(np.asarray(wrong), axis=1), np.sort(np.asarray(right.patches), axis=1), atol=1e-6
  )
  passed, _ = _passed_fraction(cl_optax.ConvRepresentations(wrong, KERNEL))
  assert passed > 0.3, passed


def _consolidate(conv_reps, dense_reps=None):
  reps = {
    "conv": {"kernel": conv_reps},
    "dense": jnp.eye(6)[:2] if dense_reps is None else dense_reps,
  }
  tx = cl_optax.gpm(1.0)
  return cl_optax.consolidate(tx.init(PARAMS), PARAMS, representations=reps)


def test_gpm_refuses_conv_representations_of_the_wrong_width_or_order():
  seen, _ = _seen_and_new_inputs()
  flat = cl_optax.conv_representations(seen, KERNEL).patches
  # a plain array (whatever its width): its order cannot be checked
  for raw in (flat, flat.reshape(-1, 3, 3, 3), flat[:, :20]):
    with pytest.raises(
      ValueError,
      match=r"leaf \['conv'\]\['kernel'\] is a plain array.*kh\*kw\*c_in = 3\*3\*3 = 27.*"
      r"cl_optax.conv_representations\(x, kernel.shape",
    ):
      _consolidate(raw)
  # patches built for another kernel: another width, or the same width in another layout
  other = cl_optax.conv_representations(jnp.ones((1, 4, 4, 2)), (3, 3, 2, 4))
  with pytest.raises(
    ValueError,
    match=r"leaf \['conv'\]\['kernel'\] holds patches built for a kernel of shape \(3, 3, 2, 4\), "
    r"but the kernel there has shape \(3, 3, 3, 4\) \(width kh\*kw\*c_in = 3\*3\*3 = 27\)",
  ):
    _consolidate(other)
  same_width = cl_optax.conv_representations(jnp.ones((1, 4, 4, 3)), (1, 9, 3, 4))
  with pytest.raises(ValueError, match=r"built for a kernel of shape \(1, 9, 3, 4\)"):
    _consolidate(same_width)
  # rows of the wrong width wrapped by hand
  with pytest.raises(ValueError, match=r"patches of shape \(18, 20\).*expected \(n, 27\)"):
    _consolidate(cl_optax.ConvRepresentations(flat[:, :20], KERNEL))
  # conv patches at a dense kernel
  with pytest.raises(ValueError, match=r"leaf \['dense'\] holds convolution patches"):
    _consolidate(cl_optax.conv_representations(seen, KERNEL), dense_reps=other)


def test_conv_representations_pass_through_chain_and_jit_consolidate():
  """Inside a chain, and when the patches are built in a jitted function."""
  seen, _ = _seen_and_new_inputs()
  tx = optax.chain(cl_optax.gpm(1.0), optax.sgd(0.1))
  reps = jax.jit(lambda x: cl_optax.conv_representations(x, KERNEL))(seen)
  state = cl_optax.consolidate(
    tx.init(PARAMS), PARAMS, representations={"conv": {"kernel": reps}, "dense": jnp.eye(6)}
  )
  assert int(state[0].feature_count["conv"]["kernel"]) == 18
