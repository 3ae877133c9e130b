"""Fisher estimates: the diagonal (:func:`fisher_diag`) and K-FAC factors (:func:`kfac_factors`).

Per-example quantities come from `jax.vmap` over the examples of a batch (or,
for the Kronecker factors, from gradients w.r.t. per-example output taps), never
from the square of a batch-mean gradient, which underestimates the Fisher by
about the batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _select
from cl_optax._batches import Batches, check_batches, scan_mean

_FISHER_KINDS = ("empirical", "sampled", "exact")
_ORIENT = (
  "Pass orientation='in_out' (Flax kernel [in, out]) or 'out_in' (Equinox / PyTorch "
  "weight [out, in]) to match the model."
)


class KronFactors(NamedTuple):
  """Kronecker factors of one dense layer's Fisher block, ``F ~= a (x) g``.

  Attributes:
    a: ``E[abar abar^T]``, ``[in(+1), in(+1)]``; ``abar`` is the layer input with
      a trailing 1 (homogeneous coordinate) when the layer has a bias.
    g: ``E[d d^T]``, ``[out, out]``; ``d`` is the gradient of the per-example
      log-likelihood w.r.t. the layer's output (pre-activation).
  """

  a: jax.Array
  g: jax.Array


def _check_kind(fisher: str, name: str, key) -> None:
  if fisher not in _FISHER_KINDS:
    raise ValueError(f"{name}: `fisher` must be one of {_FISHER_KINDS}; got {fisher!r}.")
  if fisher == "sampled" and key is None:
    raise ValueError(f"{name}: fisher='sampled' draws labels from the model; pass `key=`.")


def _nll(logits: jax.Array, label: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _fisher_diag_batch(logits_fn, params, x, y, key, fisher):
  """Sum over the batch of the per-example squared score (one Fisher kind)."""

  def one(xi, yi, ki):
    def nll(p, label):
      return _nll(logits_fn(p, xi[None])[0], label)

    if fisher == "exact":
      logits = logits_fn(params, xi[None])[0]
      probs = jax.nn.softmax(logits.astype(jnp.float32))
      labels = jnp.arange(logits.shape[-1])
      grads = jax.vmap(lambda c: jax.grad(nll)(params, c))(labels)
      return jax.tree.map(
        lambda g: jnp.tensordot(probs, jnp.square(g.astype(jnp.float32)), axes=1), grads
      )
    if fisher == "sampled":
      logits = logits_fn(params, xi[None])[0]
      yi = jax.random.categorical(ki, jax.lax.stop_gradient(logits))
    g = jax.grad(nll)(params, yi)
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), g)

  n = x.shape[0]
  keys = jax.random.split(key, n)
  y = jnp.zeros((n,), jnp.int32) if y is None else y
  per_example = jax.vmap(one)(x, y, keys)
  return jax.tree.map(lambda g: jnp.sum(g, 0), per_example)


def fisher_diag(
  logits_fn: Callable[[Any, jax.Array], jax.Array],
  params: optax.Params,
  batches: Batches,
  *,
  fisher: str = "empirical",
  key: jax.Array | None = None,
) -> optax.Params:
  r"""Diagonal Fisher information of a classifier, from per-example gradients.

  .. math::
    F = \frac{1}{N} \sum_n \mathbb{E}_{y \sim q_n}
        \left[ \left(\nabla_\theta \log p(y \mid x_n; \theta)\right)^{2} \right]

  ``fisher`` names which Fisher (van de Ven's ``fisher_labels``):

  - ``"empirical"``: :math:`q_n` is the data label (the *empirical* Fisher;
    cheap, but not the Fisher of the model);
  - ``"sampled"``: one label drawn from the model's predictive distribution
    per example (an unbiased Monte-Carlo estimate of the true Fisher; needs
    ``key``);
  - ``"exact"``: the expectation over all labels weighted by the predicted
    probabilities (the true Fisher; one gradient per class and example).

  Gradients are per example (``jax.vmap``), squared, then averaged over all
  :math:`N` examples; the square of a batch-mean gradient would underestimate
  :math:`F` by about the batch size.

  Args:
    logits_fn: ``logits_fn(params, x) -> logits`` ``[batch, classes]``
      (close over a task head or a dropout key with ``functools.partial``).
    params: the parameters at the end of the task.
    batches: :class:`cl_optax.importance.Batches` ``(x, y)``, leaves
      ``[num_batches, batch, ...]``, scanned in one jitted call (``y`` is
      read only by ``"empirical"`` and may be ``None`` otherwise).
    fisher: ``"empirical"``, ``"sampled"`` or ``"exact"``.
    key: PRNG key, required for ``"sampled"``.

  Returns:
    A float32 pytree like ``params`` (non-negative): the ``importance=`` of
    :func:`cl_optax.ewc` / :func:`cl_optax.online_ewc`, or the ``precision=`` of
    :func:`cl_optax.ncl` (diagonal).

  References:
    Kirkpatrick et al., *Overcoming catastrophic forgetting in neural
    networks*, PNAS 2017; Kunstner, Balles, Hennig, *Limitations of the
    empirical Fisher approximation*, NeurIPS 2019; code
    GMvandeVen/continual-learning ``estimate_fisher``.
  """
  _check_kind(fisher, "fisher_diag", key)
  batches = check_batches(batches, "fisher_diag", labels=fisher == "empirical")
  key = jax.random.key(0) if key is None else key
  return _fisher_diag_scan(logits_fn, params, batches, key, fisher)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _fisher_diag_scan(logits_fn, params, batches, key, fisher):
  """:func:`fisher_diag` over every batch: one scan, batch ``i`` drawn from ``fold_in(key, i)``."""

  def batch_sum(i, x, y):
    return _fisher_diag_batch(logits_fn, params, x, y, jax.random.fold_in(key, i), fisher)

  return scan_mean(batch_sum, batches)


def _kfac_batch(fn, params, x, y, key, fisher, layers):
  """Sums over one batch of ``abar abar^T`` and ``d d^T`` of every layer."""
  n = jax.tree.leaves(x)[0].shape[0]
  taps = {ly.path: jnp.zeros((n, _select.widths(params, ly)[1]), jnp.float32) for ly in layers}

  def total_nll(t, labels):
    logits, _ = fn(params, x, t)
    return jnp.sum(_nll(logits, labels)), logits

  logits, acts = fn(params, x, taps)
  logits = jax.lax.stop_gradient(logits)
  if fisher == "exact":
    probs = jax.nn.softmax(logits.astype(jnp.float32))  # [n, C]
    classes = jnp.arange(logits.shape[-1])
    d = jax.vmap(lambda c: jax.grad(lambda t: total_nll(t, jnp.full((n,), c))[0])(taps))(classes)
    gs = {k: jnp.einsum("cn,cni,cnj->ij", probs.T, v, v) for k, v in d.items()}
  else:
    if fisher == "sampled":
      y = jax.random.categorical(key, logits)
    d = jax.grad(lambda t: total_nll(t, y)[0])(taps)
    gs = {k: v.T @ v for k, v in d.items()}
  out = {}
  for layer in layers:
    a = acts[layer.path].astype(jnp.float32).reshape(n, -1)
    if layer.bias is not None:
      a = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)
    out[layer.path] = KronFactors(a=a.T @ a, g=gs[layer.path])
  return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _kfac_scan(fn, params, batches, key, fisher, layers):
  def batch_sum(i, x, y):
    return _kfac_batch(fn, params, x, y, jax.random.fold_in(key, i), fisher, layers)

  return scan_mean(batch_sum, batches)


def _check_inputs(fn, params, batches, layers) -> None:
  """Raises a ``ValueError`` where ``fn``'s layer inputs do not fit the layers' kernels."""
  first = jax.tree.map(lambda v: v[0], batches.x)
  n = jax.tree.leaves(first)[0].shape[0]
  taps = {ly.path: jnp.zeros((n, _select.widths(params, ly)[1]), jnp.float32) for ly in layers}
  try:
    _, inputs = jax.eval_shape(fn, params, first, taps)
  except (TypeError, ValueError) as e:
    widths = {ly.path: (ly.orientation, _select.stored_shape(params, ly)) for ly in layers}
    cause = str(e).splitlines()[0].rstrip(".")
    raise ValueError(
      f"kfac_factors: fn(params, x, taps) failed with taps [batch, out] for the layers "
      f"{widths} (orientation, stored kernel shape): {cause}. {_ORIENT}"
    ) from e
  for layer in layers:
    d_in, d_out = _select.widths(params, layer)
    if layer.path not in inputs:
      raise ValueError(
        f"kfac_factors: `fn` returned no input for layer {layer.path!r}; it returned inputs "
        f"for {sorted(inputs)} (fn(params, x, taps) -> (logits, {{layer: input [batch, in]}}))."
      )
    got = inputs[layer.path].shape
    if got[0] != n or int(np.prod(got[1:])) != d_in:
      raise ValueError(
        f"kfac_factors: layer {layer.path!r} ({layer.kernel} "
        f"{_select.stored_shape(params, layer)}, orientation {layer.orientation!r}: "
        f"[in, out] = [{d_in}, {d_out}]) got an input of shape {tuple(got)}; expected "
        f"[{n}, {d_in}]. {_ORIENT}"
      )


def kfac_factors(
  fn: Callable[[Any, jax.Array, dict], tuple[jax.Array, dict]],
  params: optax.Params,
  batches: Batches,
  *,
  layers: _select.Selector,
  orientation: str | None = None,
  fisher: str = "sampled",
  key: jax.Array | None = None,
) -> dict[str, KronFactors]:
  r"""Kronecker-factored Fisher (K-FAC) of dense layers, ``F_l ~= A_l (x) G_l``.

  For a dense layer ``y = a @ kernel + bias`` (kernel ``[in, out]``; an
  Equinox ``weight [out, in]`` is its transpose, the factors are the same)

  .. math::
    A = \frac{1}{N}\sum_n \bar a_n \bar a_n^\top, \qquad
    G = \frac{1}{N}\sum_n \mathbb{E}_{y \sim q_n}\!\left[d_n d_n^\top\right],
    \qquad d_n = \nabla_{y_n} \log p(y \mid x_n)

  with :math:`\bar a = (a, 1)` when the layer has a bias (homogeneous
  coordinate, last). ``fisher`` picks :math:`q_n` as in :func:`fisher_diag`
  (the official NCL code samples labels: ``"sampled"``).

  The model is called as ``fn(params, x, taps) -> (logits, inputs)``: it must
  add ``taps[name]`` (zeros ``[batch, out]``) to the output of layer ``name``
  and return the layer's input ``inputs[name]`` ``[batch, in]``. The gradient
  of the summed log-likelihood w.r.t. the per-example taps is exactly the
  per-example :math:`d_n` (the "phantom" parameters of van de Ven's code), so
  one backward pass gives all of them; no per-example parameter gradients are
  formed.

  Why an own ~40-line implementation and not kfac-jax: kfac-jax finds layers
  by tracing and graph-matching the model and brings its own optimizer and
  curvature-block machinery; here only the two factor estimates are needed,
  once per task, for plain dense layers, and this stays a pure function of
  ``(fn, params, batches)`` with no extra dependency.

  Args:
    fn: ``fn(params, x, taps) -> (logits, inputs)`` as above.
    params: parameters at the end of the task.
    batches: :class:`cl_optax.importance.Batches` ``(x, y)``, leaves
      ``[num_batches, batch, ...]``, scanned in one jitted call (``y`` is
      read only by ``"empirical"``).
    layers: a layer selector (``docs/selectors.md``): ``"l1"``,
      ``["l1", "l2"]``, ``"layers/*"``, a compiled regex or a ``(path,
      leaf) -> bool`` callable over parameter paths; it selects the dense
      layers whose 2-D ``kernel`` (Flax) or ``weight`` (Equinox) it selects.
      The factors are keyed by the layer's path (``"l1"``, ``"layers/0"``),
      as are ``taps`` and ``inputs``.
    orientation: ``"in_out"`` (Flax ``kernel [in, out]``), ``"out_in"``
      (Equinox ``weight [out, in]``) or ``None``: a ``kernel`` is
      ``"in_out"``, a non-square ``weight`` ``"out_in"``, a square ``weight``
      is refused. Checked against the width of the inputs ``fn`` returns.
    fisher: ``"sampled"`` (default), ``"exact"`` or ``"empirical"``.
    key: PRNG key, required for ``"sampled"``.

  Returns:
    ``{layer path: KronFactors(a, g)}``, float32: the ``precision=`` of
    ``cl_optax.ncl(precision="kfac")``.

  Raises:
    ValueError: for ``batches`` not a :class:`cl_optax.importance.Batches`,
      a selector that selects no dense layer (the layers found are listed),
      a square ``weight`` without ``orientation``, or layer inputs whose
      width does not match the kernel's input width.

  References:
    Martens & Grosse, *Optimizing neural networks with Kronecker-factored
    approximate curvature*, ICML 2015; Kao et al., *Natural continual
    learning*, NeurIPS 2021; code GMvandeVen/continual-learning
    ``estimate_kfac_fisher``.
  """
  _check_kind(fisher, "kfac_factors", key)
  batches = check_batches(batches, "kfac_factors", labels=fisher == "empirical")
  found = _select.find_layers(params, layers, transform="kfac_factors", orientation=orientation)
  _check_inputs(fn, params, batches, found)
  key = jax.random.key(0) if key is None else key
  return _kfac_scan(fn, params, batches, key, fisher, found)
