"""Checks shared by the transforms and estimators: signals, trees, shapes, values.

Every check raises a ``ValueError`` whose message names the transform, the
argument and, for a tree, the leaf (by its key string, see
:func:`cl_optax._trees.key_string`). The value checks of a signal
(:func:`check_in_unit_interval`, :func:`check_nonnegative`) also hold under
``jit``: on traced values they run on the host (``jax.debug.callback``) and the
jitted call raises. Other value checks need concrete arrays and are skipped
under ``jit``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _trees
from cl_optax._trees import is_concrete as is_concrete  # also read as _checks.is_concrete


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


def broadcasts_to(shape: tuple, target: tuple) -> bool:
  """Whether an array of ``shape`` broadcasts to ``target`` without growing it."""
  try:
    return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
  except ValueError:
    return False


def check_shapes(
  template: optax.Params,
  tree: optax.Params,
  *,
  transform: str,
  name: str,
  broadcastable: bool = False,
) -> None:
  """Raises a ``ValueError`` naming the first leaf whose shape does not fit."""

  def check(path, t, x):
    if _trees.is_masked(t):
      return
    tshape, xshape = np.shape(t), np.shape(x)
    ok = tshape == xshape or (broadcastable and broadcasts_to(xshape, tshape))
    if not ok:
      raise ValueError(
        f"{transform}: `{name}` leaf {_trees.key_string(path)} has shape "
        f"{xshape}; expected {tshape}"
        f"{' or a shape broadcastable to it' if broadcastable else ''}."
      )

  jax.tree_util.tree_map_with_path(check, template, tree, is_leaf=_trees.is_masked)


def check_rows(template: Any, tree: Any, *, transform: str, name: str) -> None:
  """Raises a ``ValueError`` unless each leaf of ``tree`` stacks rows of its ``template`` leaf.

  ``template`` leaves carry a leading buffer axis (``[capacity, *shape]``);
  each ``tree`` leaf must be ``[n, *shape]``, with one ``n`` for all leaves.
  """
  t_leaves, x_leaves = _trees.unmasked_leaves(template), _trees.unmasked_leaves(tree)
  if not t_leaves:
    return
  n = int(np.shape(x_leaves[0])[0]) if np.ndim(x_leaves[0]) else -1
  for path, t, x in zip(_trees.unmasked_key_strings(template), t_leaves, x_leaves, strict=True):
    if np.shape(x)[1:] != np.shape(t)[1:] or np.ndim(x) == 0 or np.shape(x)[0] != n:
      raise ValueError(
        f"{transform}: `{name}` leaf {path} has shape {np.shape(x)}; expected "
        f"(n, *{tuple(np.shape(t)[1:])}) with the same n = {n} for every leaf."
      )


def check_updates(
  updates: Any,
  template: Any,
  *,
  transform: str,
  name: str = "updates",
  shapes: bool = True,
  broadcastable: bool = False,
) -> None:
  """Raises a ``ValueError`` when ``updates`` do not fit a state tree built at init.

  ``template`` is a state field laid out like the params at init (``MaskedNode``
  where the transform keeps nothing, possibly for a whole subtree). The message
  names the missing and unexpected leaves, or the first leaf whose shape differs
  (with ``broadcastable``, a template leaf may broadcast to the update leaf).
  """
  t_def = jax.tree.structure(template, is_leaf=_trees.is_masked)
  try:
    u_leaves = t_def.flatten_up_to(updates)
  except (ValueError, TypeError):
    t_paths, u_paths = _trees.key_strings(template), _trees.key_strings(updates)
    covers = lambda a, b: b == a or b.startswith(a)  # noqa: E731
    missing = [t for t in t_paths if not any(covers(t, u) for u in u_paths)]
    extra = [u for u in u_paths if not any(covers(t, u) for t in t_paths)]
    raise ValueError(
      f"{transform}: `{name}` do not match the state (built from the params at init): "
      f"missing leaves {missing or 'none'}, unexpected leaves {extra or 'none'}; expected "
      f"the leaves {t_paths}."
    ) from None
  if not shapes:
    return
  for path, t, u in zip(_trees.key_strings(template), t_def.flatten_up_to(template), u_leaves):
    if _trees.is_masked(t) or _trees.is_masked(u) or u is None:
      continue
    tshape, ushape = tuple(np.shape(t)), tuple(np.shape(u))
    if tshape != ushape and not (broadcastable and broadcasts_to(tshape, ushape)):
      raise ValueError(
        f"{transform}: `{name}` leaf {path} has shape {ushape}; expected {tshape} "
        "(the shape of that parameter at init)."
      )


def matching_leaves(updates, tree, *, transform: str, name: str, lead: tuple = ()) -> list:
  """Pairs of (update leaf, ``tree`` leaf), skipping ``MaskedNode`` updates.

  ``tree`` may be a full tree where the updates hold ``MaskedNode`` (under
  ``optax.masked``). Raises a ``ValueError`` when ``tree`` does not have the
  updates' structure or a leaf's shape is not ``lead + update_shape``.
  """
  u_def = jax.tree.structure(updates, is_leaf=_trees.is_masked)
  try:
    t_leaves = u_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{transform}: `{name}` must be a pytree like the updates; expected structure "
      f"{u_def}, got {jax.tree.structure(tree, is_leaf=_trees.is_masked)}."
    ) from e
  pairs = []
  for path, u, t in zip(_trees.key_strings(updates), u_def.flatten_up_to(updates), t_leaves):
    if _trees.is_masked(u) or u is None:
      continue
    want = tuple(lead) + tuple(np.shape(u))
    if tuple(np.shape(t)) != want:
      raise ValueError(
        f"{transform}: `{name}` leaf {path} has shape {tuple(np.shape(t))}; expected {want}"
        f"{' (leading axis = max_tasks)' if lead else ''}."
      )
    pairs.append((u, t))
  return pairs


def _raise_if_outside(finite, lo, hi, *, where: str, low: float | None, high: float | None) -> None:
  """Raises the ``ValueError`` of :func:`_check_values` from a leaf's reductions.

  Arrays are accepted (one entry per ``vmap`` batch element under a callback).
  """
  if not bool(np.all(finite)):
    expected = (
      "" if low is None else f" in [{low:g}, {high:g}]" if high is not None else f" >= {low:g}"
    )
    raise ValueError(f"{where} holds non-finite values; expected finite values{expected}.")
  if low is None:
    return
  lo, hi = float(np.min(lo)), float(np.max(hi))
  if high is None and lo < low:
    raise ValueError(
      f"{where} has a negative value {lo:g}; expected values >= 0 (an importance / precision)."
    )
  if high is not None and (lo < low or hi > high):
    raise ValueError(
      f"{where} has values in [{lo:g}, {hi:g}]; expected values in [{low:g}, {high:g}]."
    )


def _check_values(
  tree: Any,
  *,
  transform: str,
  name: str,
  low: float | None,
  high: float | None,
  leaf: str | None = None,
) -> None:
  """Raises a ``ValueError`` naming the first leaf with non-finite values or values out of range.

  A concrete leaf is checked here (also when ``consolidate`` is traced with the
  signal closed over: ``ensure_compile_time_eval``). A traced leaf (a signal
  passed into ``jax.jit``) is checked on the host through
  ``jax.debug.callback``: the jitted call raises a ``JaxRuntimeError`` that
  carries the same message, so a bad value never reaches a stored state.
  """
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if np.size(x) == 0:
      continue
    at = _trees.key_string(path) if path else leaf
    where = f"{transform}: `{name}`" + (f" leaf {at}" if at else "")
    check = functools.partial(_raise_if_outside, where=where, low=low, high=high)
    if is_concrete(x):
      with jax.ensure_compile_time_eval():
        # Reductions, not a host copy: a leaf sharded over processes has no full copy here.
        a = jnp.asarray(x, jnp.float32)
        check(jnp.all(jnp.isfinite(a)), jnp.min(a), jnp.max(a))
    else:
      a = jnp.asarray(x, jnp.float32)
      jax.debug.callback(check, jnp.all(jnp.isfinite(a)), jnp.min(a), jnp.max(a))


def check_hyperparameter(
  value: Any,
  *,
  transform: str,
  name: str,
  low: float | None = None,
  high: float | None = None,
  open_low: bool = False,
  integer: bool = False,
) -> None:
  """Raises a ``ValueError`` when a factory argument is outside its range.

  ``value`` must be finite and in ``[low, high]`` (``(low, high]`` with
  ``open_low``). ``None``, schedules (callables) and traced values (under
  ``optax.inject_hyperparams`` inside ``jit``) are not checked.
  """
  if value is None or callable(value) or not is_concrete(value) or np.ndim(value) != 0:
    return
  v = float(np.asarray(value))
  parts = []
  if low is not None:
    parts.append(f"{'>' if open_low else '>='} {low:g}")
  if high is not None:
    parts.append(f"<= {high:g}")
  expected = ("an integer " if integer else "a finite number ") + " and ".join(parts)
  ok = np.isfinite(v) and (not integer or v == int(v))
  ok = ok and (low is None or (v > low if open_low else v >= low)) and (high is None or v <= high)
  if not ok:
    raise ValueError(f"{transform}: `{name}` must be {expected.strip()}; got {v:g}.")


def check_in_unit_interval(tree: Any, *, transform: str, name: str) -> None:
  """Raises a ``ValueError`` naming the leaf whose values leave [0, 1]."""
  _check_values(tree, transform=transform, name=name, low=0.0, high=1.0)


def check_finite(tree: Any, *, transform: str, name: str, leaf: str | None = None) -> None:
  """Raises a ``ValueError`` naming the leaf with non-finite values (also under ``jit``).

  ``leaf`` names a single-array ``tree`` in the message (a leaf of a larger signal).
  """
  _check_values(tree, transform=transform, name=name, low=None, high=None, leaf=leaf)


def check_nonnegative(tree: Any, *, transform: str, name: str) -> None:
  """Raises a ``ValueError`` naming the leaf with negative or non-finite values."""
  _check_values(tree, transform=transform, name=name, low=0.0, high=None)


def validated_signal(
  signals: dict,
  name: str,
  template: Any,
  *,
  transform: str,
  values: str | None = None,
  broadcastable: bool = False,
  rows: bool = False,
  what: str | None = None,
) -> Any:
  """The signal ``signals[name]``, checked and cut to ``template``'s structure.

  The one validation path of every state's ``consolidate``: the signal must be
  given, match the tree the transform was initialised with (positions that
  ``template`` masks become ``optax.MaskedNode``), have ``template``'s shapes
  (or shapes broadcastable to them when ``broadcastable``; with ``rows``,
  ``[n, *shape]`` stacks of rows for template leaves ``[capacity, *shape]``,
  see :func:`check_rows`) and, where ``values`` names a rule, values that keep
  it: ``"unit"`` for [0, 1], ``"nonnegative"`` for finite values >= 0.
  ``what`` describes the signal in the message for a missing one (default:
  the value rule's description).
  """
  if values not in _VALUE_RULES:
    raise ValueError(f"validated_signal: values must be one of {sorted(map(str, _VALUE_RULES))}.")
  check, rule = _VALUE_RULES[values]
  new = require_signal(signals, name, transform, rule if what is None else what)
  new = _trees.restrict_like(template, new, transform=transform, name=name)
  if rows:
    check_rows(template, new, transform=transform, name=name)
  else:
    check_shapes(template, new, transform=transform, name=name, broadcastable=broadcastable)
  if check is not None:
    check(new, transform=transform, name=name)
  return new


_VALUE_RULES = {
  None: (None, "a pytree like params"),
  "unit": (check_in_unit_interval, "a pytree like params, values in [0, 1]"),
  "nonnegative": (check_nonnegative, "a non-negative pytree like params"),
}
