r"""Per-step unit resets inside ``update`` (continual backprop, ReDo): :func:`unit_resets`.

The mechanism only: which units to reset is a :class:`UnitSelector` (a pure,
jittable function of the layer's activations, its weights after the step and
the selector's own per-unit statistics); :func:`redo_selector` is the
built-in ReDo rule. The reset itself writes the chosen units' parameters
exactly (fresh incoming weights, zero bias, zero outgoing weights; the same
leaf rule as :mod:`cl_optax._writes`) and zeroes the inner optimiser's
per-parameter state (Adam's ``mu``/``nu``) at those entries.

Which units to reset (the selectors, the ``layers`` specs) is in
:mod:`cl_optax._unit_select`; this module writes the resets. See
``docs/boundary_writes_and_resets.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _trees, _writes
from cl_optax._unit_select import (
  UnitLayer,
  UnitSelector,
  _layer_indices,
  lowest_units,
  redo_selector,
)
from cl_optax._writes import write_leaf

_TRANSFORM = "unit_resets"


class UnitResetsState(NamedTuple):
  """State of :func:`unit_resets`.

  Attributes:
    reset_inner_state: the inner transform's state (its continual states are
      reached by :func:`cl_optax.consolidate` as usual).
    reset_key: raw ``uint32[2]`` PRNG key, split at every update.
    reset_count: int32, the number of updates so far.
    reset_stats: tuple, one selector state per layer.
    reset_units: tuple, one ``[n]`` bool per layer: the units reset by the
      last update (for logging).
  """

  reset_inner_state: Any
  reset_key: jax.Array  # shape=(2,), uint32
  reset_count: jax.Array  # shape=(), int32
  reset_stats: tuple
  reset_units: tuple


def _units_mask(reset: jax.Array, ndim: int, axis: int) -> jax.Array:
  """``reset`` [n] shaped to broadcast along ``axis`` of an ``ndim`` array."""
  shape = [1] * ndim
  shape[axis] = reset.shape[0]
  return reset.reshape(shape)


def _zero_at(inner, inner_state, params, masks: dict[int, jax.Array]):
  """``inner_state`` with every params-shaped leaf zeroed where ``masks[leaf index]`` holds."""
  leaves, pdef = jax.tree.flatten(params, is_leaf=_trees.is_masked)
  rest = pdef.unflatten([masks.get(i, False) for i in range(len(leaves))])

  def zero(x, m):
    if m is False or _trees.is_masked(x) or x is None:
      return x
    return jnp.where(_writes.broadcast_like(m, x), jnp.zeros((), x.dtype), x)

  try:
    return optax.tree.map_params(inner, zero, inner_state, rest, is_leaf=_trees.is_masked)
  except (ValueError, TypeError, AttributeError, KeyError, IndexError):
    # an inner init that cannot run on optax's placeholder (e.g. ``optax.masked`` with a mask
    # tree): zero every subtree of the state laid out like params (``MaskedNode`` leaves kept)
    shapes = [jnp.shape(x) for x in leaves]

    def like_params(node):
      try:
        got = pdef.flatten_up_to(node)
      except (ValueError, TypeError):
        return False
      return all(
        _trees.is_masked(x) or jnp.shape(x) == s for x, s in zip(got, shapes, strict=True)
      ) and not all(_trees.is_masked(x) for x in got)

    def visit(node):
      if not like_params(node):
        return node
      return pdef.unflatten(
        [
          zero(x, m)
          for x, m in zip(pdef.flatten_up_to(node), pdef.flatten_up_to(rest), strict=True)
        ]
      )

    return jax.tree.map(visit, inner_state, is_leaf=like_params)


def _init_state(inner, select: UnitSelector, layers, seed: int, params) -> UnitResetsState:
  """The state :func:`unit_resets` starts from: one selector state and no reset per layer."""
  plain = _trees.unwrap_variables(params)
  idx = _layer_indices(plain, layers, transform=_TRANSFORM)
  leaves = jax.tree.leaves(plain, is_leaf=_trees.is_masked)
  widths = [jnp.shape(leaves[i_in])[-1] for _, (i_in, *_) in idx]
  return UnitResetsState(
    reset_inner_state=inner.init(params),
    reset_key=jax.random.PRNGKey(seed),
    reset_count=jnp.zeros((), jnp.int32),
    reset_stats=tuple(select.init(n) for n in widths),
    reset_units=tuple(jnp.zeros((n,), jnp.bool_) for n in widths),
  )


def _no_reset(state: UnitResetsState, inner_state, key, count) -> UnitResetsState:
  """The state after a step that resets nothing (no ``activations``, or no layer left)."""
  no_reset = tuple(jnp.zeros_like(r) for r in state.reset_units)
  return state._replace(
    reset_inner_state=inner_state, reset_key=key, reset_count=count, reset_units=no_reset
  )


def _check_activations(activations, n_layers: int) -> None:
  """Raises unless ``activations`` is a sequence of one array per layer."""
  if not isinstance(activations, Sequence) or len(activations) != n_layers:
    raise ValueError(
      f"{_TRANSFORM}: `activations` must be a sequence of {n_layers} arrays, one "
      f"[..., n] per layer; got {type(activations).__name__}"
      f"{f' of length {len(activations)}' if isinstance(activations, Sequence) else ''}."
    )


def _score_layers(
  select: UnitSelector, max_units: int, layers, idx, activations, p_leaves, u_leaves, state
) -> tuple[list[jax.Array], list[Any]]:
  """Each layer's ``[n]`` bool of units to reset and its selector stats after ``score``.

  The selector sees the weights after the step (``params + updates``) and the
  number of earlier updates.
  """

  def after(i):
    return None if i is None else p_leaves[i] + u_leaves[i]

  def after_kernel(i: int) -> jax.Array:
    return p_leaves[i] + u_leaves[i]

  resets, stats = [], []
  for (li, (i_in, i_b, i_out, _)), st in zip(idx, state.reset_stats, strict=True):
    h = activations[li]
    n = jnp.shape(p_leaves[i_in])[-1]
    if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != n:
      raise ValueError(
        f"{_TRANSFORM}: `activations`[{li}] has shape {jnp.shape(h)}; expected [..., {n}] "
        f"(the units of layer {layers[li][0]!r})."
      )
    layer = UnitLayer(after_kernel(i_in), after(i_b), after_kernel(i_out))
    score, eligible, st = select.score(st, h, layer, state.reset_count)
    resets.append(lowest_units(score, eligible, max_units))
    stats.append(st)
  return resets, stats


def _absorbed_bias(
  mean_output: Callable[[Any], jax.Array], st, r: jax.Array, w_out: jax.Array, b: jax.Array
) -> jax.Array:
  """The next layer's bias ``b`` plus the mean contribution of the reset units ``r``.

  ``w_out`` is the layer's ``kernel_out`` as it stands now (after the step and
  any earlier write); continual backprop's bias correction.
  """
  mean = jnp.where(r, mean_output(st), 0.0).astype(jnp.float32)
  w = w_out.astype(jnp.float32)
  contrib = jnp.sum(w * mean[:, None], axis=tuple(range(w.ndim - 1)))
  return (b.astype(jnp.float32) + contrib).astype(b.dtype)


def _apply_resets(
  operand, *, inner, select: UnitSelector, reinit, plain, idx, p_leaves, resets, keys
):
  """``(update leaves, inner state, stats)`` with the ``resets`` written (under ``lax.cond``).

  Per layer, in order: fresh incoming weights, zero bias, the next bias's
  absorption (with a ``mean_output``), zero outgoing weights; then the inner
  state's params-shaped leaves zeroed at the written entries and the stats
  through ``select.reset``.
  """
  u_leaves, inner_state, stats = operand
  u_leaves = list(u_leaves)
  masks: dict[int, jax.Array] = {}

  def write(i, target, m, *, moments=True):
    u_leaves[i] = write_leaf(u_leaves[i], target, m, p_leaves[i])
    if moments:
      masks[i] = masks[i] | m if i in masks else m

  for (li, (i_in, i_b, i_out, i_bo)), r, st in zip(idx, resets, stats, strict=True):
    k_in, k_out = p_leaves[i_in], p_leaves[i_out]
    draw = reinit(keys[li], k_in.shape, k_in.dtype)
    write(i_in, draw, _units_mask(r, k_in.ndim, -1))
    if i_b is not None:
      write(i_b, jnp.zeros((), p_leaves[i_b].dtype), r)
    if i_bo is not None and select.mean_output is not None:
      w_out = p_leaves[i_out] + u_leaves[i_out]
      b = p_leaves[i_bo] + u_leaves[i_bo]
      write(i_bo, _absorbed_bias(select.mean_output, st, r, w_out, b), jnp.any(r), moments=False)
    write(i_out, jnp.zeros((), k_out.dtype), _units_mask(r, k_out.ndim, -2))
  inner_state = _zero_at(inner, inner_state, plain, masks)
  stats = tuple(select.reset(st, r) for st, r in zip(stats, resets, strict=True))
  return tuple(u_leaves), inner_state, stats


def unit_resets(
  inner: optax.GradientTransformation,
  *,
  layers: Sequence[tuple[str | None, ...]],
  select: UnitSelector | None = None,
  reinit: Callable[[jax.Array, tuple, Any], jax.Array] | None = None,
  max_units: int = 1,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Resets chosen hidden units inside ``update`` (continual backprop, ReDo) around ``inner``.

  At every update, after ``inner`` computed its update :math:`u` and state:
  each layer's selector scores the units from ``activations=`` (an extra
  argument) and the weights after the step :math:`\theta + u`; at most
  ``max_units`` eligible units with the lowest scores are reset:

  - incoming weights (column ``j`` of ``kernel_in``) := a fresh draw
    ``reinit(key_l, kernel_in.shape, dtype)[..., j]``, bias ``j`` := 0,
    outgoing weights (row ``j`` of ``kernel_out``) := 0, written exactly as
    :func:`cl_optax.boundary_writes` writes (the update becomes
    ``target - params`` on those entries);
  - every params-shaped leaf of the inner state (Adam's ``mu`` and ``nu``)
    := 0 on those entries, unchanged elsewhere; scalars such as Adam's
    ``count`` are kept (as ReDo does; CBP's AdamGnT also resets a
    per-element count, which optax's Adam does not have);
  - the selector's stats go through ``select.reset``.

  Layers are processed in order; where a kernel is one layer's
  ``kernel_out`` and the next one's ``kernel_in``, a unit reset in both
  gets the later write (the fresh draw), as in continual backprop's code.

  **Put it last in the chain**, with the whole optimiser inside:
  ``unit_resets(optax.adam(lr), layers=...)`` (a rescaling after it would
  scale the writes; see :func:`cl_optax.boundary_writes`). Selection is
  jittable with fixed shapes (``lax.top_k`` over a validity mask,
  ``max_units`` static), and the draw, the writes and the moment reset run
  under a ``lax.cond`` only on steps that reset a unit.

  Keys: ``reset_key`` starts as ``jax.random.PRNGKey(seed)``; each update
  does ``reset_key, sub = split(reset_key)`` and layer ``l`` draws with
  ``split(sub, len(layers))[l]``.

  Args:
    inner: the optimiser whose update and state are wrapped (e.g.
      ``optax.adam(1e-3)``).
    layers: one ``(kernel_in_path, bias_path or None, kernel_out_path)`` per
      layer of units, paths ``/``-joined as :func:`cl_optax._trees.leaf_path`
      names them (``"dense1/kernel"``); kernels ``[..., in, out]`` (Flax).
      The output layer has no units to reset. A fourth path (or ``None``)
      names the next layer's bias: with a selector that has a
      ``mean_output`` (:func:`cl_optax.cbp_selector`), it absorbs the reset
      units' mean contribution (its Adam moments are kept).
    select: a :class:`UnitSelector`; default ``redo_selector()`` (dead units).
    reinit: the initialiser of incoming weights, ``(key, shape, dtype) ->
      array`` (``jax.nn.initializers`` style); default
      ``jax.nn.initializers.lecun_normal()`` (Flax ``Dense``'s default).
    max_units: k_max, the most units reset per layer per update (static).
    seed: seed of the PRNG key kept in the state.

  Under ``optax.inject_hyperparams`` list ``inner``, ``layers``, ``select``,
  ``reinit``, ``max_units`` and ``seed`` in ``static_args``.

  ``update(updates, state, params, *, activations=None, **extra_args)``:
  ``params`` is required; ``activations`` is a sequence with one
  ``[..., n_l]`` array per layer (post-activation outputs of this batch).
  Without it (``None``) nothing is reset that step (a static choice: a step
  with and one without activations are two traces). All extra arguments are
  forwarded to ``inner``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Dohare et al., *Loss of plasticity in deep continual learning*, Nature
    632, 2024 (continual backprop; code ``lop/algos/gnt.py``);
    Sokar et al., *The dormant neuron phenomenon in deep reinforcement
    learning*, ICML 2023 (ReDo).

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"l1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ...           "l2": {"kernel": jnp.ones((3, 1))}}
    >>> tx = cl_optax.unit_resets(
    ...     optax.sgd(0.1), layers=[("l1/kernel", "l1/bias", "l2/kernel")])
    >>> state = tx.init(params)
    >>> h = jnp.array([[1.0, 0.0, 2.0]])  # unit 1 is dead
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params, activations=[h])
    >>> optax.apply_updates(params, updates)["l2"]["kernel"][:, 0]
    Array([1., 0., 1.], dtype=float32)
  """
  select = redo_selector() if select is None else select
  reinit = jax.nn.initializers.lecun_normal() if reinit is None else reinit
  _checks.check_hyperparameter(
    max_units, transform=_TRANSFORM, name="max_units", low=1, integer=True
  )
  # a list of lists reads as triples; init checks each spec and names a bad one
  layers = cast(Any, tuple(tuple(s) if isinstance(s, Sequence) else s for s in layers))
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return _init_state(inner, select, layers, seed, params)

  def update_fn(updates, state, params=None, *, activations=None, **extra_args):
    if params is None:
      raise ValueError(
        f"{_TRANSFORM}: update needs `params` (resets are written as target - params)."
      )
    updates, inner_state = inner.update(
      updates, state.reset_inner_state, params, activations=activations, **extra_args
    )
    key, sub = jax.random.split(state.reset_key)
    count = optax.safe_increment(state.reset_count)
    plain = _trees.unwrap_variables(params)
    idx = _layer_indices(plain, layers, transform=_TRANSFORM)
    if activations is None or not idx:
      return updates, _no_reset(state, inner_state, key, count)

    _check_activations(activations, len(layers))
    u_leaves, udef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)
    p_leaves = udef.flatten_up_to(plain)
    resets, stats = _score_layers(
      select, max_units, layers, idx, activations, p_leaves, u_leaves, state
    )
    any_reset = jnp.any(jnp.stack([jnp.any(r) for r in resets]))
    do_reset = functools.partial(
      _apply_resets,
      inner=inner,
      select=select,
      reinit=reinit,
      plain=plain,
      idx=idx,
      p_leaves=p_leaves,
      resets=resets,
      keys=jax.random.split(sub, len(layers)),
    )
    operand = (tuple(u_leaves), inner_state, tuple(stats))
    u_leaves, inner_state, stats = jax.lax.cond(any_reset, do_reset, lambda op: op, operand)
    return udef.unflatten(list(u_leaves)), UnitResetsState(
      reset_inner_state=inner_state,
      reset_key=key,
      reset_count=jnp.asarray(count),
      reset_stats=stats,
      reset_units=tuple(resets),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
