"""The continual-state protocol and :func:`consolidate`, the task-boundary walk.

A continual-learning transform keeps what it must remember between tasks
(importance, anchors, bases, precisions) in a state ``NamedTuple`` that has a
``consolidate(params, **signals)`` method. :func:`consolidate` walks any optax
state tree (``chain``, ``named_chain``, ``masked``, ``partition``,
``inject_hyperparams``, ``MultiSteps``, Flax NNX's ``Optimizer``) and replaces
every such state by its consolidated copy. Merge rules live in the state's
class (static), so a consolidate never changes the tree structure, shapes
or dtypes, and never retraces a jitted step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
MaskedNode = optax.MaskedNode


@runtime_checkable
class ContinualState(Protocol):
  """A state that knows how to merge a finished task into itself.

  Implementations are ``NamedTuple`` s (so ``optax.tree.get`` finds their
  fields by name) whose ``consolidate`` returns a state of the same tree
  structure, shapes and dtypes.
  """

  def consolidate(self, params: PyTree, **signals: Any) -> ContinualState: ...


def _is_continual(x: Any) -> bool:
  return callable(getattr(type(x), "consolidate", None))


def _is_variable(x: Any) -> bool:
  # Flax NNX `Variable` (duck-typed: cl_optax never imports flax).
  return hasattr(type(x), "get_value") and hasattr(type(x), "set_value")


def _unwrap_variables(tree: PyTree) -> PyTree:
  return jax.tree.map(
    lambda x: x.get_value() if _is_variable(x) else x,
    tree,
    is_leaf=_is_variable,
  )


def consolidate(opt_state: PyTree, params: PyTree, **signals: Any) -> PyTree:
  """Ends a task: merges ``signals`` into every continual state in a tree.

  Walks ``opt_state`` (any nesting of optax states) and calls
  ``state.consolidate(params, **signals)`` on each :class:`ContinualState`.
  Each state takes the signals it needs (``importance=``, ``precision=``, ...)
  and ignores the others.

  Flax NNX: pass ``optimizer`` or ``optimizer.opt_state`` of an
  ``nnx.Optimizer`` and ``nnx.state(model, nnx.Param)``; the optimizer's
  variables are updated in place and the same object is returned.

  Args:
    opt_state: an optax state, or an ``nnx.Optimizer`` / its ``opt_state``.
    params: the parameters at the end of the task, the tree the optimiser was
      initialised with.
    **signals: per-method signals, e.g. ``importance=`` for :func:`soft_mask`.

  Returns:
    The state with every continual state consolidated (same tree structure).

  Raises:
    ValueError: if ``opt_state`` holds no continual state, or a state misses a
      signal it needs (the message names the transform and the signal).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(optax.adam(1e-3), cl_optax.soft_mask())
    >>> state = tx.init(params)
    >>> imp = {"w": jnp.array([0.0, 0.5, 1.0])}
    >>> state = cl_optax.consolidate(state, params, importance=imp)
    >>> optax.tree.get(state, "importance")["w"]
    Array([0. , 0.5, 1. ], dtype=float32)
  """
  if hasattr(opt_state, "opt_state") and hasattr(opt_state, "tx"):
    opt_state = opt_state.opt_state  # an nnx.Optimizer
  params = _unwrap_variables(params)
  signals = {k: _unwrap_variables(v) for k, v in signals.items()}
  nodes, treedef = jax.tree.flatten(opt_state, is_leaf=_is_variable)
  pure = treedef.unflatten(_unwrap_variables(nodes))

  found = []

  def visit(node):
    if _is_continual(node):
      found.append(type(node).__name__)
      return node.consolidate(params, **signals)
    return node

  new = jax.tree.map(visit, pure, is_leaf=_is_continual)
  if not found:
    raise ValueError(
      "consolidate: no continual-learning state found in opt_state "
      "(expected a tree holding a state of a cl_optax transform such as "
      f"soft_mask(); got a tree of structure {jax.tree.structure(pure)})."
    )
  if any(_is_variable(x) for x in nodes):
    for var, value in zip(nodes, treedef.flatten_up_to(new), strict=True):
      if _is_variable(var):
        var.set_value(value)
    return opt_state
  return new


# ----------------------------------------------------------------- helpers
# Used by the states' `consolidate` methods.


def require_signal(signals: dict, name: str, transform: str, what: str) -> Any:
  """Returns ``signals[name]`` or raises a ``ValueError`` naming what is missing."""
  value = signals.get(name)
  if value is None:
    given = sorted(k for k, v in signals.items() if v is not None)
    raise ValueError(
      f"{transform}: consolidate needs the signal `{name}=` ({what}); "
      f"got signals {given or 'none'}."
    )
  return value


def restrict_like(template: PyTree, tree: PyTree, *, transform: str, name: str) -> PyTree:
  """Cuts ``tree`` (a full params-shaped tree) down to ``template``'s structure.

  ``template`` is a state tree built from the params the transform was
  initialised with; inside ``optax.masked`` / ``optax.partition`` (or for
  leaves a transform does not keep) it holds ``optax.MaskedNode`` where the
  full tree has a leaf or a subtree. Those positions become ``MaskedNode``.
  """
  is_masked = lambda x: isinstance(x, MaskedNode)  # noqa: E731
  try:
    return jax.tree.map(lambda t, x: t if is_masked(t) else x, template, tree, is_leaf=is_masked)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{transform}: `{name}` does not match the parameters the transform was "
      f"initialised with. Expected a tree of structure "
      f"{jax.tree.structure(template, is_leaf=is_masked)}, got "
      f"{jax.tree.structure(tree)}."
    ) from e


def broadcasts_to(shape: tuple, target: tuple) -> bool:
  """Whether an array of ``shape`` broadcasts to ``target`` without growing it."""
  try:
    return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
  except ValueError:
    return False


def check_shapes(
  template: PyTree,
  tree: PyTree,
  *,
  transform: str,
  name: str,
  broadcastable: bool = False,
) -> None:
  """Raises a ``ValueError`` naming the first leaf whose shape does not fit."""

  def check(path, t, x):
    if isinstance(t, MaskedNode):
      return
    tshape, xshape = np.shape(t), np.shape(x)
    ok = tshape == xshape or (broadcastable and broadcasts_to(xshape, tshape))
    if not ok:
      raise ValueError(
        f"{transform}: `{name}` leaf {jax.tree_util.keystr(path)} has shape "
        f"{xshape}; expected {tshape}"
        f"{' or a shape broadcastable to it' if broadcastable else ''}."
      )

  jax.tree_util.tree_map_with_path(
    check, template, tree, is_leaf=lambda x: isinstance(x, MaskedNode)
  )


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_in_unit_interval(tree: PyTree, *, transform: str, name: str) -> None:
  """Raises a ``ValueError`` naming the leaf whose values leave [0, 1].

  Value checks need concrete arrays; under ``jit`` they are skipped.
  """
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not _is_concrete(x) or np.size(x) == 0:
      continue
    a = np.asarray(jnp.asarray(x, jnp.float32))
    if not np.all(np.isfinite(a)):
      raise ValueError(
        f"{transform}: `{name}` leaf {jax.tree_util.keystr(path)} holds "
        f"non-finite values; expected finite values in [0, 1]."
      )
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(
        f"{transform}: `{name}` leaf {jax.tree_util.keystr(path)} has values in "
        f"[{lo:g}, {hi:g}]; expected values in [0, 1]."
      )


def like(old: jax.Array, new: jax.Array) -> jax.Array:
  """``new`` in ``old``'s dtype and, outside jit, on ``old``'s sharding."""
  new = jnp.asarray(new, old.dtype)
  if (
    _is_concrete(old)
    and _is_concrete(new)
    and not new.sharding.is_equivalent_to(old.sharding, new.ndim)
  ):
    # Only when it differs: a device_put also commits the array, and a jitted
    # step sees committed and uncommitted inputs as different (a recompile).
    new = jax.device_put(new, old.sharding)
  return new


def fresh(x: jax.Array, dtype: Any) -> jax.Array:
  """A copy of ``x`` in ``dtype`` that never shares ``x``'s buffer.

  States that keep parameters (anchors, prior means) must own their buffers:
  a train step that donates both params and optimiser state would otherwise
  be handed the same buffer twice.
  """
  return jnp.array(x, dtype=dtype, copy=True)


def resolve_labels(labels: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree):
  """Evaluates an optax-style label tree or ``fn(params) -> labels``."""
  if labels is None:
    return jax.tree.map(lambda _: False, params)
  return labels(params) if callable(labels) else labels
