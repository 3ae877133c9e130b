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

from typing import Any, Protocol, cast, runtime_checkable

import jax
import optax

from cl_optax import _trees


@runtime_checkable
class ContinualState(Protocol):
  """A state that knows how to merge a finished task into itself.

  Implementations are ``NamedTuple`` s (so ``optax.tree.get`` finds their
  fields by name) whose ``consolidate`` returns a state of the same tree
  structure, shapes and dtypes.
  """

  def consolidate(self, params: optax.Params, **signals: Any) -> ContinualState: ...


def _is_continual(x: Any) -> bool:
  return callable(getattr(type(x), "consolidate", None))


def _placed_like(new: Any, old: Any) -> Any:
  """``new`` with every leaf on the sharding of the same leaf of ``old`` (see ``placed_like``)."""
  try:
    return jax.tree.map(lambda n, o: _trees.placed_like(o, n), new, old)
  except (ValueError, TypeError):  # a state whose merge changed its tree: leave it as it is
    return new


def consolidate(opt_state: optax.OptState, params: optax.Params, **signals: Any) -> optax.OptState:
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
    opt_state = cast(Any, opt_state).opt_state  # an nnx.Optimizer
  params = _trees.unwrap_variables(params)
  signals = {k: _trees.unwrap_variables(v) for k, v in signals.items()}
  nodes, treedef = jax.tree.flatten(opt_state, is_leaf=_trees.is_variable)
  pure = treedef.unflatten(_trees.unwrap_variables(nodes))

  found = []

  def visit(node):
    if _is_continual(node):
      found.append(type(node).__name__)
      return _placed_like(node.consolidate(params, **signals), node)
    return node

  new = jax.tree.map(visit, pure, is_leaf=_is_continual)
  if not found:
    raise ValueError(
      "consolidate: no continual-learning state found in opt_state "
      "(expected a tree holding a state of a cl_optax transform such as "
      f"soft_mask(); got a tree of structure {jax.tree.structure(pure)})."
    )
  if any(_trees.is_variable(x) for x in nodes):
    for var, value in zip(nodes, treedef.flatten_up_to(new), strict=True):
      if _trees.is_variable(var):
        var.set_value(value)
    return opt_state
  return new
