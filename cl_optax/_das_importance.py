r"""DAS unit and head importance (Ke et al., ICLR 2023), for :func:`soft_mask`.

DAS ("continual pre-training of language models") scores attention heads and
feed-forward units by the gradient of a loss w.r.t. virtual multiplicative
gates (value 1) on them, normalises per layer, and soft-masks the gradients
of the parameters that feed each unit. Here:

- :func:`das_units` computes the gate importance from a model function that
  takes the gates (proxy KL between two dropout passes, or the domain's own
  loss);
- :func:`das_normalize` is the official per-layer normalisation;
- :func:`das_param_importance` spreads gate importance onto the parameter
  leaves of Flax attention / dense layers as *broadcastable* leaves, the form
  :func:`cl_optax.soft_mask` keeps with ``importance_shapes=``.

The accumulation across domains (the paper's EMax, an element-wise max in the
official code) is :func:`cl_optax.consolidate`'s merge rule for soft_mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _select, _trees
from cl_optax._batches import Batches, check_batches, scan_sum
from cl_optax._standardize import standardised_tanh

GatedFn = Callable[[Any, Any, Any, jax.Array], jax.Array]

_LOSSES = ("proxy_kl",)
_NAME = "das_param_importance"


def das_normalize(raw: chex.ArrayTree, *, stacked: bool = False) -> chex.ArrayTree:
  r"""DAS per-layer normalisation ``|tanh((I - mean I) / std I)|``, values in [0, 1).

  The official ``impt_norm`` standardises each layer's units separately
  (torch's unbiased std) and takes ``|tanh|``. A layer whose units all have
  the same raw importance gets 0 (the official code divides by a zero std).

  Args:
    raw: pytree of raw gate importances.
    stacked: ``False``: every leaf is one layer (standardised over all its
      entries). ``True``: every leaf is ``[layers, ...]`` as in the official
      code (``head_impt [L, heads]``) and each slice along axis 0 is
      standardised separately.

  Returns:
    A pytree like ``raw`` in float32 with values in [0, 1).
  """

  def norm(x):
    x = jnp.asarray(x)
    if stacked:
      if x.ndim < 1:
        raise ValueError(
          f"das_normalize: with stacked=True every leaf needs a leading layer axis; "
          f"got a leaf of shape {x.shape}."
        )
      return jax.vmap(standardised_tanh)(x)
    return standardised_tanh(x)

  return jax.tree.map(norm, raw)


def _proxy_kl(student: jax.Array, teacher: jax.Array, axis: int) -> jax.Array:
  """Summed ``KL(softmax(teacher) || softmax(student))`` over batch size (``DistillKL(T=1)``)."""
  log_s = jax.nn.log_softmax(student.astype(jnp.float32), axis=axis)
  log_t = jax.nn.log_softmax(teacher.astype(jnp.float32), axis=axis)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s)) / student.shape[0]


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _gate_grad(fn, params, gates, batch, key, loss, kl_axis, tokens):
  """Gradient of one batch's loss w.r.t. the gates, and the batch's token count."""

  def objective(g):
    if loss == "proxy_kl":
      k_student, k_teacher = jax.random.split(key)
      out = fn(params, g, batch, k_student)
      value = _proxy_kl(out, fn(params, g, batch, k_teacher), kl_axis)
    else:
      out = fn(params, g, batch, key)
      value = loss(out, batch)
    n = tokens(batch) if tokens is not None else np.prod(out.shape[:-1])
    return value, jnp.asarray(n, jnp.float32)

  grads, n = jax.grad(objective, has_aux=True)(gates)
  return grads, n


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _das_scan(fn, params, gates, batches, key, loss, kl_axis, tokens):
  """The summed gate gradients of every batch (one scan) over their summed token count."""

  def batch_sum(i, x, y):
    batch = x if y is None else (x, y)
    return _gate_grad(fn, params, gates, batch, jax.random.fold_in(key, i), loss, kl_axis, tokens)

  grads, n = scan_sum(batch_sum, batches)
  return jax.tree.map(lambda g: g / n, grads)


def das_units(
  fn: GatedFn,
  params: optax.Params,
  gates: chex.ArrayTree,
  batches: Batches,
  *,
  key: jax.Array | None = None,
  loss: str | Callable[[jax.Array, Any], jax.Array] = "proxy_kl",
  kl_axis: int = -1,
  tokens: Callable[[Any], jax.Array] | None = None,
  stacked: bool = False,
  normalize: bool = True,
) -> chex.ArrayTree:
  r"""DAS importance of attention heads and feed-forward units (Ke et al., 2023).

  With virtual gates :math:`g` (all ones) multiplying the heads' outputs and
  the units' activations,

  .. math::
    I^{raw} = \frac{\sum_b \partial L_b / \partial g}{\sum_b n_b}, \qquad
    I_l = \left|\tanh\!\left(\frac{I^{raw}_l - \mathrm{mean}\, I^{raw}_l}
                                 {\mathrm{std}\, I^{raw}_l}\right)\right|
    \text{ per layer } l

  where :math:`n_b` is the number of tokens of batch :math:`b`. The *signed*
  gradient is summed over batches (the absolute value comes after the
  standardisation, as in the official code). Two losses:

  - ``loss="proxy_kl"`` (no labels; the paper's importance of the general
    knowledge, computed once before the first domain): ``fn`` is called twice
    with different dropout keys, ``L = KL(softmax(h_2) || softmax(h_1)) / B``
    on its output ``h`` (the last hidden states ``[B, T, D]``); the gradient
    flows through both passes, as the official code's model and teacher both
    take the gates.
  - ``loss=callable``: the domain's own loss
    ``loss(fn(params, gates, batch, key), batch) -> scalar`` (the official
    "after_mlm" importance, computed after training on a domain with its
    masked-LM loss; here any LM loss).

  Merge the result across domains with :func:`cl_optax.consolidate` (element
  -wise max, the official ``accumulate_impt``) after mapping it onto the
  parameters with :func:`das_param_importance`.

  Departures from the official code: its ``DistillKL`` applies the softmax on
  ``dim=1`` of ``[B, T, D]`` hidden states, i.e. over *positions*; the default
  here is the feature axis (``kl_axis=-1``), what the paper describes; pass
  ``kl_axis=1`` to match the code. A layer with constant raw importance gets
  0 instead of NaN.

  Args:
    fn: ``fn(params, gates, batch, key) -> output``, the model run with the
      gates (dropout drawn from ``key``). For ``"proxy_kl"`` the output is the
      representation to compare, for a callable ``loss`` whatever it takes
      (e.g. logits). Jitted with ``fn`` static: pass the same function for
      every domain and it compiles once.
    params: the model's parameters (not differentiated).
    gates: pytree of gate values (ones), e.g. ``{"heads": [L, H], "ffn":
      [L, F]}`` or one subtree per layer; the gradient is taken at these values.
    batches: :class:`cl_optax.importance.Batches`, leaves ``[num_batches,
      batch, ...]``, scanned in one jitted call; ``fn``, ``loss`` and
      ``tokens`` get one batch's ``x`` (any pytree ``fn`` accepts) when ``y``
      is ``None``, else the pair ``(x, y)``.
    key: PRNG key for the dropout passes (required for ``"proxy_kl"``); batch
      ``i`` uses ``fold_in(key, i)``.
    loss: ``"proxy_kl"`` or ``loss(output, batch) -> scalar``.
    kl_axis: the softmax axis of the proxy KL.
    tokens: ``tokens(batch) -> count`` (e.g. the sum of an attention mask);
      default: the number of entries of the output without its last axis
      (``B * T``). It scales every gate alike, so it changes only the raw
      (``normalize=False``) values.
    stacked: whether gate leaves are ``[layers, units]`` (normalised per row);
      see :func:`das_normalize`.
    normalize: ``False`` returns the raw :math:`I^{raw}` (to normalise later
      with :func:`das_normalize`, as the official code saves it).

  Returns:
    A pytree like ``gates``: values in [0, 1) when ``normalize``.

  References:
    Ke, Shao, Lin, Konishi, Kim, Liu, *Continual Pre-training of Language
    Models*, ICLR 2023 (arXiv:2210.05549), Sec. 3; code
    UIC-Liu-Lab/ContinualLM ``networks/baselines/softmask.py``
    (``compute_impt``, ``impt_norm``, ``accumulate_impt``) and
    ``networks/posttrain/model.py`` (``prune_loss``).
  """
  if isinstance(loss, str) and loss not in _LOSSES:
    raise ValueError(f"das_units: `loss` must be 'proxy_kl' or a callable; got {loss!r}.")
  if not isinstance(loss, str) and not callable(loss):
    raise ValueError(f"das_units: `loss` must be 'proxy_kl' or a callable; got {loss!r}.")
  if loss == "proxy_kl" and key is None:
    raise ValueError(
      "das_units: loss='proxy_kl' needs `key=` (the two dropout passes differ only by it)."
    )
  if not jax.tree.leaves(gates):
    raise ValueError("das_units: `gates` has no leaves; expected gate arrays (ones).")
  key = jax.random.key(0) if key is None else key
  batches = check_batches(batches, "das_units")
  raw = _das_scan(fn, params, gates, batches, key, loss, kl_axis, tokens)
  return das_normalize(raw, stacked=stacked) if normalize else raw


# ------------------------------------------------------------ to parameters
_QKV = ("query", "key", "value")


def _as_path(path) -> tuple[str, ...]:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(str(p) for p in path)


def _attention_leaf(rel: tuple[str, ...], shape, imp, where: str):
  """Importance leaf for a parameter of an attention module (heads on axis -2 / 0)."""
  h = imp.shape[0]
  if len(rel) == 2 and rel[0] in _QKV and rel[1] == "kernel" and len(shape) == 3:
    want, out = shape[1], imp.reshape(1, h, 1)  # [features, heads, head_dim]
  elif len(rel) == 2 and rel[0] in _QKV and rel[1] == "bias" and len(shape) == 2:
    want, out = shape[0], imp.reshape(h, 1)  # [heads, head_dim]
  elif rel == ("out", "kernel") and len(shape) == 3:
    want, out = shape[0], imp.reshape(h, 1, 1)  # [heads, head_dim, features]
  else:  # out bias (mixes all heads), query/key norms: not masked
    return jnp.zeros((), jnp.float32)
  if want != h:
    raise ValueError(
      f"das_param_importance: {where} has {h} head importances but its parameter "
      f"{'/'.join(rel)} of shape {tuple(shape)} has {want} heads."
    )
  return out


def _is_out_in(names: tuple[str, ...], shape: Any, orientation: str | None) -> bool:
  """Whether a ``"units"`` layer's leaf is a 2-D ``[out, in]`` weight (Equinox / PyTorch)."""
  if len(shape) != 2 or names[-1:] == ("bias",):
    return False
  return _select.kernel_orientation(_NAME, "/".join(names), shape, orientation) == "out_in"


def _out_in_leaf(rel: tuple[str, ...], shape: Any, imp: jax.Array, where: str) -> jax.Array:
  """Unit importance ``[out, 1]`` for an ``[out, in]`` weight."""
  if shape[0] != imp.shape[0]:
    raise ValueError(
      f"{_NAME}: {where} has {imp.shape[0]} unit importances but its [out, in] "
      f"weight {'/'.join(rel)} has shape {tuple(shape)} (expected axis 0 {imp.shape[0]})."
    )
  return imp[:, None]


def das_param_importance(
  params: optax.Params,
  units: Mapping[str | tuple, tuple[str, jax.Array]],
  *,
  orientation: str | None = None,
) -> optax.Params:
  r"""Spreads DAS head / unit importance onto parameter leaves (broadcastable).

  ``units`` maps the path of a layer inside ``params`` (``"blocks/0/attn"`` or
  ``("blocks", 0, "attn")``) to ``(kind, importance)``:

  - ``"heads"``, importance ``[heads]``, for a multi-head attention layer laid
    out as Flax's ``nnx.MultiHeadAttention`` / linen
    ``MultiHeadDotProductAttention``: ``query``/``key``/``value`` kernels
    ``[features, heads, head_dim]`` get ``[1, heads, 1]``, their biases
    ``[heads, head_dim]`` get ``[heads, 1]``, the ``out`` kernel ``[heads,
    head_dim, features]`` gets ``[heads, 1, 1]``: every parameter that feeds
    head *h* (its query, key and value projections and its rows of the output
    projection) gets the head's importance.
  - ``"units"``, importance ``[out]``, for a dense layer (``nnx.Linear``,
    linen ``Dense``, kernel ``[..., out]``, bias ``[out]``) whose output units
    are gated: kernel and bias get ``[out]``, so unit *j*'s weights and bias
    get its importance (DAS's intermediate and output FFN units). An
    Equinox ``Linear`` (``weight [out, in]``, see ``orientation``) gets
    ``[out, 1]`` on its weight.

  Every other leaf (embeddings, layer norms, the LM head, the attention output
  bias) gets a scalar 0: it is not masked and costs one number of state.

  It works on plain pytrees by path and key names (``cl_optax`` does not
  import Flax): pass ``nnx.state(model, nnx.Param)`` or a linen params dict.
  The result is what :func:`cl_optax.consolidate` takes as ``importance=``,
  and its shapes are what :func:`cl_optax.soft_mask` needs as
  ``importance_shapes=`` (call it once with zero importances at init).

  Departures from the official code: for Q/K/V it masks the head's output
  slice; the official ``weight.grad *= head_mask`` on a torch ``[out, in]``
  weight broadcasts over the *input* columns. It also scales the attention
  output bias by a head mask indexed by output feature; here that bias is
  not masked (it belongs to no head).

  Args:
    params: the parameter pytree (Flax ``Variable`` s are unwrapped).
    units: ``{path: (kind, importance)}`` as above; ``path`` is a layer's
      ``/``-joined path (``docs/selectors.md``).
    orientation: of the ``"units"`` layers' 2-D kernels: ``"in_out"``
      (Flax), ``"out_in"`` (Equinox / PyTorch) or ``None`` (a ``weight`` is
      ``"out_in"``, refused when square; a ``kernel`` ``"in_out"``).

  Returns:
    A pytree like ``params`` (plain arrays) of float32 importance leaves, each
    broadcastable to its parameter.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> params = {"ffn": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    ...           "ln": {"scale": jnp.ones(4)}}
    >>> imp = cl_optax.importance.das_param_importance(
    ...     params, {"ffn": ("units", jnp.array([0.0, 0.5, 1.0]))})
    >>> imp["ffn"]["kernel"], imp["ln"]["scale"]
    (Array([0. , 0.5, 1. ], dtype=float32), Array(0., dtype=float32))
  """
  plain = _trees.unwrap_variables(params)
  specs = {}
  for path, spec in units.items():
    if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0] in ("heads", "units")):
      raise ValueError(
        f"das_param_importance: units[{path!r}] must be ('heads' | 'units', importance); "
        f"got {spec!r}."
      )
    imp = jnp.asarray(spec[1], jnp.float32)
    if imp.ndim != 1:
      raise ValueError(
        f"das_param_importance: units[{path!r}] importance must be 1-D (one value per "
        f"{spec[0][:-1]}); got shape {imp.shape}."
      )
    specs[_as_path(path)] = (spec[0], imp)
  used = set()

  def leaf(kpath, p):
    names = _trees.path_names(kpath)
    hits = [s for s in specs if names[: len(s)] == s]
    if len(hits) > 1:
      raise ValueError(
        f"das_param_importance: parameter {'/'.join(names)} lies under several "
        f"entries of `units`: {['/'.join(h) for h in hits]}."
      )
    if not hits:
      return jnp.zeros((), jnp.float32)
    (prefix,) = hits
    used.add(prefix)
    kind, imp = specs[prefix]
    rel, shape, where = names[len(prefix) :], np.shape(p), "/".join(prefix)
    if kind == "heads":
      return _attention_leaf(rel, shape, imp, where)
    if _is_out_in(names, shape, orientation):
      return _out_in_leaf(rel, shape, imp, where)
    if len(shape) == 0 or shape[-1] != imp.shape[0]:
      raise ValueError(
        f"das_param_importance: {where} has {imp.shape[0]} unit importances but its "
        f"parameter {'/'.join(rel)} has shape {tuple(shape)} (expected last axis "
        f"{imp.shape[0]})."
      )
    return imp

  out = jax.tree_util.tree_map_with_path(leaf, plain)
  missing = [s for s in specs if s not in used]
  if missing:
    available = sorted(
      {"/".join(_trees.path_names(kp)[:-1]) for kp, _ in jax.tree_util.tree_leaves_with_path(plain)}
    )
    raise ValueError(
      f"das_param_importance: no parameters under {['/'.join(m) for m in missing]}; "
      f"layers in params: {available[:20]}."
    )
  return out
