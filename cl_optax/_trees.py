"""Tree helpers shared by the transforms and estimators.

Leaves are named two ways, each for one use:

- a **layer path** (:func:`leaf_path`) is the ``/``-joined key names from the
  root (dict keys, attribute names, sequence indices), with the trailing
  ``value`` of a Flax NNX ``Variable`` dropped: ``"dense/kernel"``,
  ``"blocks/0/attn"``, ``"layers/0/weight"`` (Equinox). Arguments a user
  writes by hand use it: the selectors of ``cl_optax/_select.py``
  (``layers=`` of :func:`cl_optax.ncl`, :func:`cl_optax.gpm` and
  :func:`cl_optax.importance.kfac_factors`, ``head=`` of
  :func:`cl_optax.soft_mask`; ``docs/selectors.md``) and the ``units=`` of
  :func:`cl_optax.importance.das_param_importance`.
- a **key string** (:func:`key_string`, ``jax.tree_util.keystr``:
  ``"['dense']['kernel']"``) names a leaf in error messages and matches the
  leaves of two trees by position in the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.core import Tracer


def is_masked(x: Any) -> bool:
  """Whether ``x`` is an ``optax.MaskedNode`` (a leaf a transform does not keep)."""
  return isinstance(x, optax.MaskedNode)


def is_concrete(x: Any) -> bool:
  """Whether ``x`` holds values (not a tracer inside ``jit`` / ``grad``)."""
  return not isinstance(x, Tracer)


def map_unmasked(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``f(x, *r)`` on every leaf ``x`` of ``tree``; ``MaskedNode`` and ``None`` leaves stay.

  ``rest`` are trees with ``tree``'s structure (or ``tree``'s structure down to
  its leaves, like ``jax.tree.map``). A leaf is left as it is where ``tree``
  holds a ``MaskedNode`` or ``None``, or where any tree of ``rest`` holds a
  ``MaskedNode`` at its position.
  """

  def leaf(x, *r):
    if is_masked(x) or x is None or any(is_masked(y) for y in r):
      return x
    return f(x, *r)

  return jax.tree.map(leaf, tree, *rest, is_leaf=is_masked)


def placed_like(old: Any, new: Any) -> Any:
  """``new`` on ``old``'s sharding where ``old`` is committed to one and ``new`` sits elsewhere.

  A merge combines a state with signals of whatever sharding the caller's
  estimator produced (e.g. an importance sharded differently from its
  parameter); the state keeps the layout it got at init, like the params. An
  uncommitted ``old`` (on the default device, following its inputs) has no
  layout to keep, and a ``device_put`` would commit ``new`` (a jitted step sees
  committed and uncommitted inputs as different: a recompile, or devices that
  do not match). Under ``jit`` (tracers) and for non-array leaves ``new`` is
  returned as it is.
  """
  if not (isinstance(old, jax.Array) and isinstance(new, jax.Array)):
    return new
  if not (is_concrete(old) and is_concrete(new)) or not old.committed:
    return new
  if new.sharding.is_equivalent_to(old.sharding, new.ndim):
    return new
  return jax.device_put(new, old.sharding)


def mask_leaf(u: Any, keep: Any) -> Any:
  """``u * keep`` in ``u``'s dtype; non-finite entries of ``u`` pass unchanged.

  The guard selects the *factor* (``keep``, or 1 where ``u`` is not finite)
  rather than between ``u * keep`` and ``u``: the same values, but XLA then
  fuses the product into the loop that computes ``u`` (e.g. Adam's last one)
  also when ``keep`` is broadcast from a unit importance; selecting between
  two uses of ``u`` makes it write ``u`` out and read it back (two passes over
  the parameters).
  """
  if is_masked(u) or u is None:
    return u
  return u * jnp.where(jnp.isfinite(u), jnp.asarray(keep, dtype=u.dtype), 1)


def is_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX ``Variable`` (duck-typed: cl_optax never imports flax)."""
  return hasattr(type(x), "get_value") and hasattr(type(x), "set_value")


def unwrap_variables(tree: Any) -> Any:
  """``tree`` with every NNX ``Variable`` replaced by its value."""
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def key_name(k: Any) -> str:
  """The name of one path entry: a dict key, an attribute name or an index."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The key names of a ``jax.tree_util`` key path, NNX's trailing ``value`` dropped."""
  names = tuple(key_name(k) for k in path)
  if len(names) > 1 and names[-1] == "value":  # an NNX Variable
    names = names[:-1]
  return names


def leaf_path(path: Sequence[Any]) -> str:
  """The ``/``-joined path of a ``jax.tree_util`` key path (the module convention)."""
  return "/".join(path_names(path))


def key_string(path: Sequence[Any]) -> str:
  """A key path as ``jax.tree_util.keystr`` writes it (messages, tree matching)."""
  return jax.tree_util.keystr(tuple(path))


def key_strings(tree: Any) -> list[str]:
  """The key string of every leaf of ``tree`` in flatten order (``MaskedNode`` is a leaf)."""
  return [
    key_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0]
  ]


def leaf_paths(tree: Any, *, is_leaf: Callable[[Any], bool] = is_masked) -> list[str]:
  """The path of every leaf of ``tree`` in flatten order (``MaskedNode`` counts as a leaf)."""
  return [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def unmasked_leaves(tree: Any) -> list:
  """The leaves of ``tree`` that are not ``MaskedNode``, in flatten order."""
  return [x for x in jax.tree.leaves(tree, is_leaf=is_masked) if not is_masked(x)]


def replace_unmasked(tree: Any, new_leaves: Sequence[Any]) -> Any:
  """``tree`` with its non-``MaskedNode`` leaves replaced, in order, by ``new_leaves``."""
  treedef = jax.tree.structure(tree, is_leaf=is_masked)
  it = iter(new_leaves)
  return treedef.unflatten([x if is_masked(x) else next(it) for x in treedef.flatten_up_to(tree)])


def restrict_like(template: Any, tree: Any, *, transform: str, name: str) -> Any:
  """Cuts ``tree`` (a full params-shaped tree) down to ``template``'s structure.

  ``template`` is a state tree built from the params the transform was
  initialised with; inside ``optax.masked`` / ``optax.partition`` (or for
  leaves a transform does not keep) it holds ``optax.MaskedNode`` where the
  full tree has a leaf or a subtree. Those positions become ``MaskedNode``.
  """
  try:
    return jax.tree.map(lambda t, x: t if is_masked(t) else x, template, tree, is_leaf=is_masked)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{transform}: `{name}` does not match the parameters the transform was "
      f"initialised with. Expected a tree of structure "
      f"{jax.tree.structure(template, is_leaf=is_masked)}, got "
      f"{jax.tree.structure(tree)}."
    ) from e


def restrict_to_updates(updates: Any, tree: Any) -> Any:
  """``tree`` cut to the updates' structure (``MaskedNode`` / ``None`` where they have one)."""
  u_def = jax.tree.structure(updates, is_leaf=is_masked)
  pairs = zip(u_def.flatten_up_to(updates), u_def.flatten_up_to(tree), strict=True)
  return u_def.unflatten([u if is_masked(u) or u is None else t for u, t in pairs])


def resolve_labels(labels: Any, params: Any) -> Any:
  """Evaluates an optax-style label tree or ``fn(params) -> labels`` (all ``False`` if None)."""
  if labels is None:
    return jax.tree.map(lambda _: False, params)
  return labels(params) if callable(labels) else labels


def fresh(x: jax.Array, dtype: Any) -> jax.Array:
  """A copy of ``x`` in ``dtype`` that never shares ``x``'s buffer.

  States that keep parameters (anchors, prior means) must own their buffers:
  a train step that donates both params and optimiser state would otherwise
  be handed the same buffer twice.
  """
  return jnp.array(x, dtype=dtype, copy=True)


def unmasked_key_strings(tree: Any) -> list[str]:
  """The key strings of the leaves of ``tree`` that are not ``MaskedNode``, in flatten order."""
  leaves = jax.tree.leaves(tree, is_leaf=is_masked)
  return [p for p, x in zip(key_strings(tree), leaves, strict=True) if not is_masked(x)]


def map_nodes(tree: Any, is_node: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
  """``fn(node)`` on every node of ``tree`` for which ``is_node`` holds; the rest stays.

  The walk of :func:`cl_optax.consolidate` for any node kind: NNX ``Variable``
  leaves are unwrapped first, and when ``tree`` holds some (an
  ``nnx.Optimizer``'s state) their values are set in place and ``tree`` itself
  is returned.
  """
  nodes, treedef = jax.tree.flatten(tree, is_leaf=is_variable)
  pure = treedef.unflatten(unwrap_variables(nodes))
  new = jax.tree.map(lambda x: fn(x) if is_node(x) else x, pure, is_leaf=is_node)
  if any(is_variable(x) for x in nodes):
    for var, value in zip(nodes, treedef.flatten_up_to(new), strict=True):
      if is_variable(var):
        var.set_value(value)
    return tree
  return new


def optimizer_state(opt_state: Any) -> Any:
  """The optax state inside an ``nnx.Optimizer`` (its ``opt_state``), or ``opt_state`` itself."""
  if hasattr(opt_state, "opt_state") and hasattr(opt_state, "tx"):
    return opt_state.opt_state
  return opt_state


def find_state(opt_state: Any, cls: type, caller: str) -> Any:
  """The one ``cls`` state inside ``opt_state`` (a chain's tuple, an ``nnx.Optimizer``...).

  Raises ValueError naming ``caller`` when there is none or more than one.
  """
  found = [
    x
    for x in jax.tree.leaves(optimizer_state(opt_state), is_leaf=lambda x: isinstance(x, cls))
    if isinstance(x, cls)
  ]
  if len(found) != 1:
    raise ValueError(f"{caller}: expected one {cls.__name__} in the state; found {len(found)}.")
  return found[0]


def selected(params: Any, mask: Any, label: Any = None) -> list[str]:
  """The key strings of the leaves of ``params`` that ``mask`` selects.

  ``mask`` is what ``optax.masked`` takes: a tree of booleans like ``params``
  (or a prefix of it) or ``fn(params)`` returning one. With ``label``, it is a
  label tree / function as ``optax.partition`` takes, and the leaves with
  that label are selected. The mask is evaluated on ``params`` as given, as
  optax would (under Flax NNX its function sees ``Variable`` s, whose paths end
  in ``.value``); the key strings returned are those of the plain tree
  (``"['l1']['kernel']"``). An empty list means the mask selects nothing: a
  transform under it would pass every update through unchanged.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> params = {"l1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> cl_optax.selected(params, lambda p: {"l1": {"kernel": True, "bias": False}})
    ["['l1']['kernel']"]
    >>> cl_optax.selected(params, {"l1": "trunk"}, label="trunk")
    ["['l1']['bias']", "['l1']['kernel']"]
  """
  tree = mask(params) if callable(mask) else mask
  tree = unwrap_variables(tree)
  plain = unwrap_variables(params)
  pick = (lambda m: m == label) if label is not None else bool
  full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: pick(m), sub), tree, plain)
  return [key_string(p) for p, m in jax.tree_util.tree_flatten_with_path(full)[0] if m]
