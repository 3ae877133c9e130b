"""The continual-state protocol and :func:`consolidate`, the task-boundary walk.

A continual-learning transform keeps what it must remember between tasks
(importance, anchors, bases, precisions) in a state ``NamedTuple`` that has a
``consolidate(params, **signals)`` method. :func:`consolidate` walks any optax
state tree (``chain``, ``named_chain``, ``masked``, ``partition``,
``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, Flax NNX's
``Optimizer``) and replaces every such state by its consolidated copy. Merge
rules live in the state's class (static), so a consolidate never changes the
tree structure, shapes or dtypes, and never retraces a jitted step.

Each state has an *address*: the dict keys on the way to it (``named_chain``
names, ``partition`` / ``multi_transform`` labels) and its transform's name,
joined by ``/`` (``"ewc"``, ``"left/soft_mask"``). ``consolidate(..., to=)``
gives a signal to the states an address picks (see :func:`consolidate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import optax

from cl_optax import _debug, _trees


@runtime_checkable
class ContinualState(Protocol):
  """A state that knows how to merge a finished task into itself.

  Implementations are ``NamedTuple`` s (so ``optax.tree.get`` finds their
  fields by name) whose ``consolidate`` returns a state of the same tree
  structure, shapes and dtypes. They declare, as class attributes,
  ``TRANSFORM`` (the transform's name, the last part of its address),
  ``SIGNALS`` (the ``consolidate`` signals it reads) and ``EXTRA_ARGS`` (the
  extra args its ``update`` reads); a state without ``SIGNALS`` is taken to
  read any signal.
  """

  def consolidate(self, params: optax.Params, **signals: Any) -> ContinualState: ...


def _is_continual(x: Any) -> bool:
  return callable(getattr(type(x), "consolidate", None))


class _Found(NamedTuple):
  """A continual state in the tree and where it sits."""

  state: Any
  labels: tuple[str, ...]  # dict keys on the way: named_chain names, partition labels

  @property
  def name(self) -> str:
    return str(getattr(type(self.state), "TRANSFORM", type(self.state).__name__))

  @property
  def address(self) -> str:
    return "/".join((*self.labels, self.name))

  def reads(self, signal: str) -> bool:
    known = getattr(type(self.state), "SIGNALS", None)
    return known is None or signal in known

  def reads_text(self) -> str:
    known = getattr(type(self.state), "SIGNALS", None)
    if known is None:
      return "any signal"
    return ", ".join(f"`{s}=`" for s in known) or "no signal"


def _labels(path: tuple) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _matches(address: str, found: _Found) -> bool:
  """Whether the ``/``-separated names of ``address`` appear, in order, in the state's address."""
  names = iter((*found.labels, found.name))
  return all(any(part == n for n in names) for part in address.split("/"))


def _placed_like(new: Any, old: Any) -> Any:
  """``new`` with every leaf on the sharding of the same leaf of ``old`` (see ``placed_like``)."""
  try:
    return jax.tree.map(lambda n, o: _trees.placed_like(o, n), new, old)
  except (ValueError, TypeError):  # a state whose merge changed its tree: leave it as it is
    return new


def _route(found: list[_Found], signals: dict, to: Mapping) -> list[dict]:
  """The signals of each state: the broadcast ones, overridden by those addressed to it.

  Raises a ``ValueError`` for an address that picks no state, picks states
  none of which reads the signal, or picks two that read it.
  """
  routed = [dict(signals) for _ in found]
  where = f"the continual states found are at {[f.address for f in found]}"
  for address, given in to.items():
    if not isinstance(given, Mapping):
      raise ValueError(
        f"consolidate: to[{address!r}] must be a dict of signals, e.g. "
        f"{{'importance': tree}}; got {type(given).__name__}."
      )
    hits = [i for i, f in enumerate(found) if _matches(str(address), f)]
    if not hits:
      raise ValueError(f"consolidate: the address {address!r} matches no state; {where}.")
    for name, value in given.items():
      takers = [i for i in hits if found[i].reads(name)]
      if not takers:
        reads = "; ".join(f"{found[i].address} reads {found[i].reads_text()}" for i in hits)
        raise ValueError(
          f"consolidate: no state at {address!r} reads `{name}=` ({reads}); {where}. "
          f"to[{address!r}] maps signal names to values, e.g. {{'importance': tree}}."
        )
      if len(takers) > 1:
        raise ValueError(
          f"consolidate: the address {address!r} is ambiguous for `{name}=`: it matches "
          f"{[found[i].address for i in takers]}, which all read it; {where}. Address one "
          "by a longer path; give two instances of one transform distinct names with "
          "optax.named_chain or optax.partition labels."
        )
      routed[takers[0]][name] = value
  return routed


def _selects_nothing(state: Any) -> bool:
  """Whether every params-shaped field of ``state`` (one holding a ``MaskedNode``) is all masked."""
  fields = [
    f for f in state if any(map(_trees.is_masked, jax.tree.leaves(f, is_leaf=_trees.is_masked)))
  ]
  return bool(fields) and not any(_trees.unmasked_leaves(f) for f in fields)


def _consolidate_one(found: _Found, signals: dict, params: Any, count: int) -> Any:
  """``found.state`` consolidated; a ``ValueError`` names the state's address among several."""
  try:
    new = found.state.consolidate(params, **signals)
  except ValueError as e:
    if count == 1:
      raise
    raise ValueError(f"{e} (the state at {found.address!r})") from e
  return _placed_like(new, found.state)


def _debug_warnings(found: list[_Found], signals: dict, routed: list[dict]) -> None:
  for name, value in signals.items():
    if not any(f.reads(name) for f in found):
      reads = "; ".join(f"{f.address} reads {f.reads_text()}" for f in found)
      _debug.warn(f"cl_optax debug: consolidate got `{name}=`, which no state reads ({reads}).")
    reach = [f.address for f, r in zip(found, routed) if f.reads(name) and r[name] is value]
    if len({a.rsplit("/", 1)[-1] for a in reach}) > 1:
      _debug.warn(
        f"cl_optax debug: the plain `{name}=` reaches {reach}, different transforms that "
        f"read it by their own rules; if each needs its own, address it: "
        f"to={{{reach[0]!r}: {{{name!r}: ...}}}}."
      )
  for f in found:
    if _selects_nothing(f.state):
      _debug.warn(
        f"cl_optax debug: the state at {f.address!r} holds no parameter: its mask "
        "(optax.masked / optax.partition, or its own layer selector) selected nothing, so "
        "the transform passes updates through unchanged. See what a mask selects with "
        "cl_optax.selected(params, mask)."
      )


def consolidate(
  opt_state: optax.OptState,
  params: optax.Params,
  *,
  to: Mapping[str, Mapping[str, Any]] | None = None,
  **signals: Any,
) -> optax.OptState:
  """Ends a task: merges ``signals`` into every continual state in a tree.

  Walks ``opt_state`` (any nesting of optax states) and calls
  ``state.consolidate(params, **signals)`` on each :class:`ContinualState`.
  Each state takes the signals it needs (``importance=``, ``precision=``, ...)
  and ignores the others.

  **Addressed signals.** A plain keyword goes to every state. ``to`` maps an
  *address* to signals for the states it picks: ``to={"ewc": {"importance":
  fisher}}``. A state's address is the dict keys on the way to it
  (``optax.named_chain`` names, ``optax.partition`` labels) followed by its
  transform's name, joined by ``/``: ``"ewc"``, ``"soft_mask"``,
  ``"left/soft_mask"``. An address picks the states whose address holds its
  ``/``-separated names in that order (``"left"``, ``"left/soft_mask"``). For
  the state it picks, an addressed signal replaces a plain keyword of the same
  name. An address that picks no state, or picks no state / two states that
  read one of its signals, is a ``ValueError`` listing the addresses found;
  the state is then unchanged (nothing is written into an ``nnx.Optimizer``).

  **Under jit.** Value checks (an importance in [0, 1], finite values) run
  eagerly on concrete signals and raise a ``ValueError``. On traced signals
  (``jax.jit(consolidate)``) they run on the host through
  ``jax.debug.callback``: the jitted call (or, as JAX dispatches
  asynchronously, the first use of its result) raises a
  ``jax.errors.JaxRuntimeError`` carrying the same message, so a bad value is
  never stored silently.

  Flax NNX: pass ``optimizer`` or ``optimizer.opt_state`` of an
  ``nnx.Optimizer`` and ``nnx.state(model, nnx.Param)``; the optimizer's
  variables are updated in place and the same object is returned.

  Args:
    opt_state: an optax state, or an ``nnx.Optimizer`` / its ``opt_state``.
    params: the parameters at the end of the task, the tree the optimiser was
      initialised with.
    to: ``{address: {signal name: value}}``, signals for the states an address
      picks.
    **signals: per-method signals, e.g. ``importance=`` for :func:`soft_mask`.

  Returns:
    The state with every continual state consolidated (same tree structure).

  Raises:
    ValueError: if ``opt_state`` holds no continual state, a state misses a
      signal it needs (the message names the transform and the signal), a
      signal's tree or values are wrong, or an address in ``to`` does not pick
      exactly one state reading each of its signals.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(cl_optax.ewc(1.0), optax.adam(1e-3), cl_optax.soft_mask())
    >>> state = tx.init(params)
    >>> imp = {"w": jnp.array([0.0, 0.5, 1.0])}
    >>> fisher = {"w": jnp.array([10.0, 20.0, 30.0])}
    >>> to = {"ewc": {"importance": fisher}}  # only ewc gets the Fisher
    >>> state = cl_optax.consolidate(state, params, importance=imp, to=to)
    >>> state[0].ewc_importance["w"], state[2].importance["w"]
    (Array([10., 20., 30.], dtype=float32), Array([0. , 0.5, 1. ], dtype=float32))
  """
  opt_state = _trees.optimizer_state(opt_state)
  params = _trees.unwrap_variables(params)
  signals = {k: _trees.unwrap_variables(v) for k, v in signals.items()}
  to = {
    a: {k: _trees.unwrap_variables(v) for k, v in s.items()} if isinstance(s, Mapping) else s
    for a, s in (to or {}).items()
  }
  nodes, treedef = jax.tree.flatten(opt_state, is_leaf=_trees.is_variable)
  pure = treedef.unflatten(_trees.unwrap_variables(nodes))
  flat, state_def = jax.tree_util.tree_flatten_with_path(pure, is_leaf=_is_continual)
  found = [_Found(x, _labels(p)) for p, x in flat if _is_continual(x)]
  if not found:
    raise ValueError(
      "consolidate: no continual-learning state found in opt_state "
      "(expected a tree holding a state of a cl_optax transform such as "
      f"soft_mask(); got a tree of structure {jax.tree.structure(pure)})."
    )
  routed = _route(found, signals, to)
  if _debug.enabled():
    _debug_warnings(found, signals, routed)
  per_state = iter(zip(found, routed))
  new_leaves = [
    _consolidate_one(*next(per_state), params, len(found)) if _is_continual(x) else x
    for _, x in flat
  ]
  new = state_def.unflatten(new_leaves)
  if any(_trees.is_variable(x) for x in nodes):
    values = treedef.flatten_up_to(new)
    for var, value in zip(nodes, values, strict=True):
      if _trees.is_variable(var):
        var.set_value(value)
    if all(_trees.is_variable(x) for x in nodes):  # an nnx.Optimizer's state: in place
      return opt_state
    # A state built from NNX params (Variables in its prior mean) also holds plain
    # leaves (NCL's Kronecker factors): those are new, so return the rebuilt tree.
    return treedef.unflatten(
      [v if _trees.is_variable(v) else x for v, x in zip(nodes, values, strict=True)]
    )
  return new


def unread_extra_args(opt_state: optax.OptState, **extra_args: Any) -> list[str]:
  """The names among ``extra_args`` that no cl_optax state in ``opt_state`` reads.

  A debug helper for a chain's per-step extra args (``tx.update(g, state,
  params, ref_grads=...)``): every cl_optax transform declares the extra args
  its ``update`` reads (its state's ``EXTRA_ARGS``). It sees only cl_optax
  transforms: an extra arg read by another library's transform (optax's
  ``value=`` of ``polyak_sgd``) is listed too.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> state = optax.chain(optax.adam(1e-3), cl_optax.soft_mask()).init({"w": jnp.ones(2)})
    >>> cl_optax.unread_extra_args(state, ref_grads={"w": jnp.ones(2)})
    ['ref_grads']
  """
  opt_state = _trees.optimizer_state(opt_state)
  states = jax.tree.leaves(opt_state, is_leaf=_is_continual)
  read = {a for s in states if _is_continual(s) for a in getattr(type(s), "EXTRA_ARGS", ())}
  return sorted(set(extra_args) - read)
