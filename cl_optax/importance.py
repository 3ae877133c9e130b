r"""Importance estimators: pure functions ``(fn, params, batches) -> pytree``.

``batches`` is either a stacked pair ``(xs, ys)`` whose arrays carry a
leading number-of-batches axis (scanned inside one jitted call), or any
iterable of ``(x, y)`` pairs (one jitted call per batch, summed on device).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax._das import das_normalize, das_param_importance, das_units  # noqa: F401
from cl_optax._standardize import standardised_tanh

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array, int], jax.Array]


def _is_stacked(batches) -> bool:
  return (
    isinstance(batches, tuple | list)
    and len(batches) == 2
    and all(hasattr(b, "ndim") for b in batches)
  )


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _summed_head_grad(logits_fn, params, xs, ys, head, is_current):
  """Sum over the stacked batches of the gradient of one head's SPG loss."""

  def loss(p, x, y):
    logits = logits_fn(p, x, head)
    if is_current:
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.sum(logits)  # official `OtherTasksLoss`: labels are ignored

  def body(acc, batch):
    g = jax.grad(loss)(params, *batch)
    return optax.tree.add(acc, g), None

  return jax.lax.scan(body, optax.tree.zeros_like(params), (xs, ys))[0]


def spg(
  logits_fn: LogitsFn,
  params: PyTree,
  batches: tuple[jax.Array, jax.Array] | Iterable[tuple[jax.Array, jax.Array]],
  *,
  task: int,
) -> PyTree:
  r"""SPG parameter importance of the task just trained (Konishi et al., 2023).

  For every head :math:`\tau \le t` on the current task's data only:

  .. math::
    G_\tau = \sum_{b} \nabla_\theta L_\tau(b), \quad
    L_t = \mathrm{CE}(f_t(x), y), \quad
    L_{\tau < t} = \textstyle\sum f_\tau(x) \\
    \gamma_\tau = \left|\tanh\!\left(\frac{G_\tau - \mathrm{mean}\,G_\tau}
                       {\mathrm{std}\,G_\tau}\right)\right| \text{ per tensor},
    \qquad \gamma^{t} = \max_{\tau \le t} \gamma_\tau .

  Gradients are *summed* over batches of batch-mean losses (as the official
  code accumulates ``backward()`` over its loader); the standardisation makes
  the result independent of that scale. Pass the result to
  :func:`cl_optax.consolidate` as ``importance=``.

  Departures from the official code: it runs the model in train mode
  (dropout on); here ``logits_fn`` is called as given, so close over a
  dropout key to match it. A tensor with constant gradient gets importance 0
  (the official code divides by a zero std and yields NaN).

  Args:
    logits_fn: ``logits_fn(params, x, head) -> logits`` for task head ``head``
      (a Python int, static under jit).
    params: parameters at the end of task ``task``.
    batches: the task's training data, stacked ``(xs, ys)`` with shapes
      ``[n_batches, batch, ...]`` and ``[n_batches, batch]``, or an iterable
      of ``(x, y)`` batches. Labels are integer classes of head ``task``.
    task: index of the task just trained (its head gets the cross-entropy;
      heads ``0..task-1`` get the sum of their logits).

  Returns:
    A pytree like ``params`` with values in [0, 1].

  References:
    Konishi et al., *Parameter-Level Soft-Masking for Continual Learning*,
    ICML 2023, Eq. 1-3; code UIC-Liu-Lab/SPG ``model_spg.py``
    ``compute_importance`` and ``spg.py`` ``compute_mask``.
  """
  if not isinstance(task, int) or task < 0:
    raise ValueError(f"spg: `task` must be a non-negative int; got {task!r}.")
  if _is_stacked(batches):
    stacked = [tuple(jnp.asarray(b) for b in batches)]
  else:
    stacked = [(jnp.asarray(x)[None], jnp.asarray(y)[None]) for x, y in batches]
  if not stacked:
    raise ValueError("spg: `batches` is empty; expected at least one (x, y) batch.")

  importance = None
  for head in range(task + 1):
    grads = None
    for xs, ys in stacked:
      g = _summed_head_grad(logits_fn, params, xs, ys, head, head == task)
      grads = g if grads is None else optax.tree.add(grads, g)
    gamma = jax.tree.map(standardised_tanh, grads)
    importance = gamma if importance is None else jax.tree.map(jnp.maximum, importance, gamma)
  return importance


# ------------------------------------------------------------ Fisher, MAS, KFAC
# Per-example quantities come from `jax.vmap` over the examples of a batch (or,
# for the Kronecker factors, from gradients w.r.t. per-example output taps), never
# from the square of a batch-mean gradient, which underestimates the Fisher by
# about the batch size.

FISHER_KINDS = ("empirical", "sampled", "exact")


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


def _batch_list(batches, name: str):
  """Stacked ``(xs, ys)`` (integer ``ys`` with two leading axes), or an iterable."""
  if _is_stacked(batches) and jnp.issubdtype(jnp.asarray(batches[1]).dtype, jnp.integer):
    xs, ys = batches
    return [(jnp.asarray(xs[i]), jnp.asarray(ys[i])) for i in range(len(xs))]
  out = []
  for b in batches:
    if isinstance(b, tuple | list):
      x, y = b[0], (b[1] if len(b) > 1 else None)
    else:
      x, y = b, None
    out.append((jnp.asarray(x), None if y is None else jnp.asarray(y)))
  if not out:
    raise ValueError(f"{name}: `batches` is empty; expected at least one (x, y) batch.")
  return out


def _check_kind(fisher: str, name: str, key) -> None:
  if fisher not in FISHER_KINDS:
    raise ValueError(f"{name}: `fisher` must be one of {FISHER_KINDS}; got {fisher!r}.")
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
  logits_fn: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  batches,
  *,
  fisher: str = "empirical",
  key: jax.Array | None = None,
) -> PyTree:
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
    batches: stacked ``(xs, ys)`` with a leading number-of-batches axis, or an
      iterable of ``(x, y)`` batches (labels are ignored unless empirical).
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
  key = jax.random.key(0) if key is None else key
  total, count = None, 0
  for i, (x, y) in enumerate(_batch_list(batches, "fisher_diag")):
    if fisher == "empirical" and y is None:
      raise ValueError("fisher_diag: fisher='empirical' needs labels; got batches without y.")
    s = _fisher_diag_batch(logits_fn, params, x, y, jax.random.fold_in(key, i), fisher)
    total = s if total is None else optax.tree.add(total, s)
    count += x.shape[0]
  return jax.tree.map(lambda s: s / count, total)


@functools.partial(jax.jit, static_argnums=(0,))
def _mas_batch(fn, params, x):
  def one(xi):
    g = jax.grad(lambda p: jnp.sum(jnp.square(fn(p, xi[None]).astype(jnp.float32))))(params)
    return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), g)

  return jax.tree.map(lambda g: jnp.sum(g, 0), jax.vmap(one)(x))


def mas(fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, batches) -> PyTree:
  r"""MAS importance (Aljundi et al., 2018): mean absolute output-norm gradient.

  .. math::
    \Omega = \frac{1}{N} \sum_n \left| \nabla_\theta \, \| f(x_n; \theta) \|_2^2 \right|

  per example (``jax.vmap``), as in the paper's Eq. 2-4. (Avalanche / FACIL
  take the absolute value of the gradient of the *batch-mean*, un-squared norm
  instead; this follows the paper.) Unsupervised: labels are ignored.

  Args:
    fn: ``fn(params, x) -> outputs`` ``[batch, ...]`` (the logits, pre-softmax).
    params: the parameters at the end of the task.
    batches: stacked ``(xs, ys)``, or an iterable of ``(x, y)`` pairs or of
      plain ``x`` arrays.

  Returns:
    A float32 pytree like ``params``: the ``importance=`` of :func:`cl_optax.mas`.

  References:
    Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars, *Memory Aware Synapses:
    Learning what (not) to forget*, ECCV 2018, Eq. 4.
  """
  total, count = None, 0
  for x, _ in _batch_list(batches, "mas"):
    s = _mas_batch(fn, params, x)
    total = s if total is None else optax.tree.add(total, s)
    count += x.shape[0]
  return jax.tree.map(lambda s: s / count, total)


def layer_subtree(params: PyTree, name: str) -> Any:
  """The subtree of ``params`` at the ``/``-separated key path ``name``."""
  node = params
  for k in name.split("/"):
    try:
      node = node[k]
    except (KeyError, TypeError, IndexError) as e:
      try:
        node = node[int(k)]
      except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"layer {name!r} not found in params (no key {k!r}).") from e
  if not hasattr(node, "__getitem__") or "kernel" not in node:
    raise ValueError(
      f"layer {name!r}: expected a dense layer, a mapping with a 2-D `kernel` "
      f"[in, out] and optionally a `bias` [out]; got {type(node).__name__}."
    )
  return node


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _kfac_batch(fn, params, x, y, key, fisher, layers):
  n = x.shape[0]
  subs = {name: layer_subtree(params, name) for name in layers}
  taps = {name: jnp.zeros((n, jnp.shape(s["kernel"])[1]), jnp.float32) for name, s in subs.items()}

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
  for name, s in subs.items():
    a = acts[name].astype(jnp.float32).reshape(n, -1)
    if "bias" in s:
      a = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)
    out[name] = KronFactors(a=a.T @ a, g=gs[name])
  return out


def kfac_factors(
  fn: Callable[[PyTree, jax.Array, dict], tuple[jax.Array, dict]],
  params: PyTree,
  batches,
  *,
  layers: Sequence[str],
  fisher: str = "sampled",
  key: jax.Array | None = None,
) -> dict[str, KronFactors]:
  r"""Kronecker-factored Fisher (K-FAC) of dense layers, ``F_l ~= A_l (x) G_l``.

  For a dense layer ``y = a @ kernel + bias`` (Flax layout, kernel ``[in, out]``)

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
    batches: stacked ``(xs, ys)`` or an iterable of ``(x, y)`` batches.
    layers: ``/``-separated key paths of the dense layers in ``params``
      (each a mapping with ``kernel`` and optionally ``bias``).
    fisher: ``"sampled"`` (default), ``"exact"`` or ``"empirical"``.
    key: PRNG key, required for ``"sampled"``.

  Returns:
    ``{name: KronFactors(a, g)}``, float32: the ``precision=`` of
    ``cl_optax.ncl(precision="kfac")``.

  References:
    Martens & Grosse, *Optimizing neural networks with Kronecker-factored
    approximate curvature*, ICML 2015; Kao et al., *Natural continual
    learning*, NeurIPS 2021; code GMvandeVen/continual-learning
    ``estimate_kfac_fisher``.
  """
  _check_kind(fisher, "kfac_factors", key)
  layers = tuple(layers)
  if not layers:
    raise ValueError("kfac_factors: `layers` is empty; expected the dense layers' key paths.")
  for name in layers:
    layer_subtree(params, name)
  key = jax.random.key(0) if key is None else key
  total, count = None, 0
  for i, (x, y) in enumerate(_batch_list(batches, "kfac_factors")):
    if fisher == "empirical" and y is None:
      raise ValueError("kfac_factors: fisher='empirical' needs labels; got batches without y.")
    s = _kfac_batch(fn, params, x, y, jax.random.fold_in(key, i), fisher, layers)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    count += x.shape[0]
  return jax.tree.map(lambda s: s / count, total)
