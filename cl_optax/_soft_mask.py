r"""Importance soft-masking: :func:`soft_mask` (SPG per parameter, DAS per unit or head).

Where it goes in a chain: see :mod:`cl_optax.masking`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _select, _trees


class SoftMaskState(NamedTuple):
  """State of :func:`soft_mask`.

  Attributes:
    importance: accumulated importance in [0, 1], one leaf per parameter leaf,
      shaped like it or, for unit/head importance, of a shape broadcastable to
      it (fixed at init by ``importance_shapes``). Head leaves hold
      ``optax.MaskedNode``: heads are scaled by ``head_scale`` instead.
    head_scale: one minus the mean of the per-parameter mask over all non-head
      parameters (``1`` before the first consolidate); a unit importance
      counts once for every parameter it covers.
  """

  TRANSFORM = "soft_mask"
  SIGNALS = ("importance",)
  EXTRA_ARGS = ()

  importance: Any
  head_scale: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> SoftMaskState:
    """Merges a task's ``importance`` by element-wise max (SPG's ``a_max``).

    ``importance`` leaves must have the state's shapes (or shapes that
    broadcast to them, e.g. a scalar per leaf).
    """
    new = _checks.validated_signal(
      signals, "importance", self.importance, transform="soft_mask", values="unit",
      broadcastable=True,
    )  # fmt: skip
    merged = jax.tree.map(
      lambda old, i: jnp.maximum(old, _trees.placed_like(old, jnp.asarray(i, old.dtype))),
      self.importance,
      new,
    )
    return SoftMaskState(importance=merged, head_scale=_head_scale(merged, params))


def _head_scale(importance: Any, params: Any) -> jax.Array:
  """``1 - mean`` of the per-parameter mask: leaf ``A_i`` counts ``size(p_i) / size(A_i)`` times."""
  leaves = jax.tree.leaves(importance)
  sizes = [
    p.size
    for p in jax.tree.leaves(
      _trees.restrict_like(importance, params, transform="soft_mask", name="params")
    )
  ]
  count = sum(sizes)
  if count == 0:
    return jnp.ones((), jnp.float32)
  total = sum(
    (jnp.sum(x, dtype=jnp.float32) * (n / x.size) for x, n in zip(leaves, sizes, strict=True) if n),
    start=jnp.zeros((), jnp.float32),
  )
  return (1.0 - total / count).astype(jnp.float32)


def _is_shape_leaf(x) -> bool:
  if _trees.is_masked(x):  # an empty tuple, but a node of the params tree (under optax.masked)
    return False
  return (
    x is None
    or hasattr(x, "shape")
    or (isinstance(x, tuple) and all(isinstance(d, int) for d in x))
  )


def _state_shapes(spec, params) -> Any:
  """A tree like ``params`` of ``ShapeDtypeStruct`` s: the importance shape per leaf.

  ``spec`` (``importance_shapes``) is ``None`` (every leaf its param's shape),
  a tree like params of shapes / arrays / ``None``, or ``fn(params)`` giving
  one. Each shape must broadcast to its parameter's shape.
  """
  leaves, treedef = jax.tree.flatten(params)
  if spec is None:
    shapes = [jnp.shape(p) for p in leaves]
  else:
    tree = spec(params) if callable(spec) else spec
    plain = _trees.unwrap_variables(params)
    given, given_def = jax.tree.flatten(_trees.unwrap_variables(tree), is_leaf=_is_shape_leaf)
    if given_def != jax.tree.structure(plain):
      raise ValueError(
        "soft_mask: `importance_shapes` must be a tree like params (leaves: a shape "
        f"tuple, an array or None); expected structure {jax.tree.structure(plain)}, "
        f"got {given_def}."
      )
    shapes = []
    paths = [_trees.key_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(plain)[0]]
    for path, p, s in zip(paths, leaves, given, strict=True):
      pshape = tuple(jnp.shape(p))
      s = pshape if s is None else tuple(s.shape if hasattr(s, "shape") else s)
      if not _checks.broadcasts_to(s, pshape):
        raise ValueError(
          f"soft_mask: `importance_shapes` leaf {path} is {s}; expected a shape "
          f"broadcastable to the parameter's shape {pshape}."
        )
      shapes.append(s)
  return treedef.unflatten([jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])


def soft_mask(
  *,
  head: Any | Callable[[Any], Any] | None = None,
  importance_dtype: Any = None,
  importance_shapes: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Importance soft-masking: SPG per parameter, DAS per unit or head.

  Each update entry is scaled by one minus its accumulated importance

  .. math::
    u \leftarrow (1 - A) \odot u, \qquad
    A^{t} = \max(A^{t-1}, \gamma^{t-1}) \quad \text{(element-wise)}

  where :math:`\gamma^{t-1} \in [0, 1]` is the importance of the task just
  finished (see :func:`cl_optax.importance.spg`), merged by
  :func:`cl_optax.consolidate` with ``importance=``. Before the first
  consolidate :math:`A = 0` and the transform is the identity.

  Task heads (``head`` labels) follow the official code: they are not masked
  per entry but scaled by the scalar :math:`1 - \mathrm{mean}(A)` over all
  non-head entries, so a new head learns slower as the trunk fills up.

  Place it after an adaptive base optimiser (``chain(adam(lr), soft_mask())``);
  see the module docstring for why.

  **Unit and head importance (DAS, Ke et al., 2023).** An importance leaf may
  have a smaller shape that *broadcasts* (NumPy rules) to its parameter leaf:
  ``[heads, 1, 1]`` for an attention output kernel ``[heads, head_dim,
  features]``, ``[1, heads, 1]`` for a query kernel ``[features, heads,
  head_dim]``, ``[out]`` for a dense kernel ``[in, out]`` (one value per
  output unit), ``()`` for one value for the whole leaf. Every parameter then
  gets the importance of the unit it feeds, so the update equals the one with
  the explicitly broadcast per-parameter mask, while the state holds one value
  per unit. The shapes are fixed at ``init`` by ``importance_shapes`` (so a
  consolidate never retraces the step); see
  :func:`cl_optax.importance.das_param_importance`, which builds such trees
  for Flax attention and dense layers. ``head_scale`` uses the mean of the
  per-parameter mask (a unit importance counts once per parameter it covers),
  the same number the explicit mask gives.

  Args:
    head: the task-head leaves: a selector over parameter paths
      (``docs/selectors.md``: ``"head"``, ``"heads/*"``, a compiled regex or
      a ``(path, leaf) -> bool`` callable; ``"head"`` selects every leaf
      under ``head``), or, as before, ``optax.masked``-style labels (a
      pytree of bools like params or a prefix of it, or a function
      ``params -> bools``). With ``optax.inject_hyperparams`` pass it in
      ``static_args``.
    importance_dtype: storage dtype of the accumulated importance, float32 when
      ``None`` (``jnp.bfloat16`` halves its memory and traffic). Under
      ``optax.inject_hyperparams`` list it in ``static_args``: a dtype is
      callable and would be taken for a schedule.
    importance_shapes: the shape of the importance kept for each parameter
      leaf: a tree like params whose leaves are shape tuples, arrays (their
      shape is used, e.g. an importance tree itself) or ``None`` (the
      parameter's own shape), or a function ``params -> tree``. ``None``
      (default): per-parameter importance. Each shape must broadcast to its
      parameter's shape. List it in ``static_args`` under
      ``optax.inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Konishi, Kurokawa, Ono, Ke, Kim, Liu, *Parameter-Level Soft-Masking for
    Continual Learning*, ICML 2023 (arXiv:2306.14775), Sec. 3; official code
    UIC-Liu-Lab/SPG (``spg.py`` ``softmask``/``a_max``, ``classifier.py``).
    Ke, Shao, Lin, Konishi, Kim, Liu, *Continual Pre-training of Language
    Models*, ICLR 2023 (arXiv:2210.05549), Sec. 3 (unit importance,
    soft-masking); code UIC-Liu-Lab/ContinualLM
    (``networks/baselines/softmask.py`` ``soft_mask_gradient``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(optax.sgd(1.0), cl_optax.soft_mask())
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(
    ...     state, params, importance={"w": jnp.array([0.0, 0.5, 1.0])})
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> updates["w"]
    Array([-1. , -0.5, -0. ], dtype=float32)

    One importance per output unit of a ``[2, 3]`` kernel:

    >>> params = {"kernel": jnp.ones((2, 3))}
    >>> tx = cl_optax.soft_mask(importance_shapes={"kernel": (3,)})
    >>> state = cl_optax.consolidate(
    ...     tx.init(params), params, importance={"kernel": jnp.array([0.0, 0.5, 1.0])})
    >>> tx.update({"kernel": jnp.ones((2, 3))}, state)[0]["kernel"]
    Array([[1. , 0.5, 0. ],
           [1. , 0.5, 0. ]], dtype=float32)
  """

  dtype = jnp.float32 if importance_dtype is None else importance_dtype

  def init_fn(params: optax.Params) -> SoftMaskState:
    labels, _ = _select.labels(head, params, lambda p: _trees.resolve_labels(None, p))
    shapes = _state_shapes(importance_shapes, params)  # like params, ShapeDtypeStruct leaves
    zeros = lambda tree: jax.tree.map(  # noqa: E731
      lambda s, p: (  # state shards like params where it is shaped like them
        jnp.zeros_like(p, dtype=dtype) if s.shape == jnp.shape(p) else jnp.zeros(s.shape, dtype)
      ),
      *tree,
    )
    importance = jax.tree.map(  # labels may be a prefix of params
      lambda is_head, s, p: optax.MaskedNode() if is_head else zeros((s, p)),
      labels,
      shapes,
      params,
    )
    return SoftMaskState(importance=importance, head_scale=jnp.ones((), jnp.float32))

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("soft_mask", extra_args)
    del params, extra_args
    state = cast(SoftMaskState, state)
    _checks.check_updates(updates, state.importance, transform="soft_mask", broadcastable=True)

    def mask(imp, u):
      if _trees.is_masked(imp):  # a head leaf or subtree, or one optax.masked left out
        return jax.tree.map(lambda x: _trees.mask_leaf(x, state.head_scale), u)
      return _trees.mask_leaf(u, 1.0 - imp.astype(jnp.float32))

    return jax.tree.map(mask, state.importance, updates, is_leaf=_trees.is_masked), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
