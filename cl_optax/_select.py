"""Selectors: the one way to choose parameters and layers by path (``docs/selectors.md``).

A **selector** names leaves of a parameter tree by their **path**, the
``/``-joined key names from the root (:func:`cl_optax._trees.leaf_path`): dict
keys (Flax linen, NNX state, plain dicts), attribute names (Equinox modules)
and sequence indices, with NNX's trailing ``value`` dropped. The same model
reads ``"l1/kernel"`` under Flax and ``"l1/weight"`` or ``"layers/0/weight"``
under Equinox (``jax.tree_util.keystr`` writes ``.layers[0].weight``). A
selector is one of:

- a string, a glob (``fnmatch``: ``*``, ``?``, ``[...]``) matched against the
  path and against every prefix of it, so ``"l1"`` selects ``l1/kernel`` and
  ``l1/bias``, ``"*/kernel"`` every kernel, and an exact path itself;
- a compiled regular expression (``re.compile(...)``), full-matched the same way;
- a callable ``(path, leaf) -> bool`` over the leaf's path and value;
- a list or tuple of these: a leaf is selected when any one selects it.

A **dense layer** is the node above a 2-D ``kernel`` or ``weight`` leaf (with
its sibling ``bias``, if any); a layer selector selects the layers whose
kernel it selects. **Orientation**: ``"in_out"`` (Flax ``kernel [in, out]``)
or ``"out_in"`` (Equinox / PyTorch ``weight [out, in]``). Undeclared, a
``kernel`` is ``"in_out"`` and a non-square ``weight`` ``"out_in"``; a square
``weight`` needs the declaration (its shape cannot tell).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import numpy as np

from cl_optax import _trees

Selector = str | re.Pattern | Callable[[str, Any], bool] | Sequence[Any]
"""A glob string, a compiled regex, a ``(path, leaf) -> bool`` callable, or a list of them."""

ORIENTATIONS = ("in_out", "out_in")
_KERNEL_NAMES = ("kernel", "weight")


def _prefixes(path: str) -> list[str]:
  parts = path.split("/")
  return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def matches(selector: Selector, path: str, leaf: Any) -> bool:
  """Whether ``selector`` selects the leaf at ``path`` (see the module docstring)."""
  if isinstance(selector, str):
    return any(fnmatch.fnmatchcase(p, selector) for p in _prefixes(path))
  if isinstance(selector, re.Pattern):
    return any(selector.fullmatch(p) for p in _prefixes(path))
  if callable(selector):
    return bool(selector(path, leaf))
  if isinstance(selector, list | tuple):
    return any(matches(s, path, leaf) for s in selector)
  raise TypeError(
    f"a selector is a glob string, a compiled regex, a (path, leaf) -> bool callable or a "
    f"list of them; got {type(selector).__name__}."
  )


def is_selector(x: Any) -> bool:
  """Whether ``x`` is a selector rather than an ``optax.masked``-style label tree."""
  if isinstance(x, str | re.Pattern):
    return True
  if isinstance(x, list | tuple):
    return bool(x) and all(is_selector(s) for s in x)
  return False


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of every leaf of ``tree`` (NNX unwrapped, ``MaskedNode`` a leaf)."""
  plain = _trees.unwrap_variables(tree)
  flat = jax.tree_util.tree_flatten_with_path(plain, is_leaf=_trees.is_masked)[0]
  return [(_trees.leaf_path(p), x) for p, x in flat]


def select_mask(tree: Any, selector: Selector) -> Any:
  """A tree of bools like ``tree``'s leaves: ``True`` where ``selector`` selects."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_trees.is_masked)
  return treedef.unflatten([matches(selector, _trees.leaf_path(p), x) for p, x in flat])


def _takes_path_and_leaf(fn: Callable[..., Any]) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return len([p for p in params if p.kind in positional and p.default is p.empty]) == 2


def labels(spec: Any, params: Any, default: Callable[[Any], Any]) -> tuple[Any, bool]:
  """The bool tree a ``layers=`` / ``head=`` argument marks, and whether it was a selector.

  A selector (a string, a regex, a list of them, or a callable of two
  arguments ``(path, leaf)``) is matched over paths; a callable of one
  argument is an ``optax.masked``-style ``fn(params) -> labels`` and any
  other value a label tree (both kept from before selectors); ``None`` is
  ``default(params)``.
  """
  if spec is None:
    return default(params), False
  if is_selector(spec) or (callable(spec) and _takes_path_and_leaf(spec)):
    return select_mask(params, cast(Selector, spec)), True
  return _trees.resolve_labels(spec, params), False


def kernel_orientation(transform: str, path: str, shape: Any, declared: str | None) -> str:
  """The orientation of a projected kernel leaf (GPM): declared, or read from its name.

  A ``weight`` (Equinox / PyTorch) is ``"out_in"``; anything else ``"in_out"``
  (Flax, all axes but the last are inputs). A square 2-D ``weight`` needs the
  declaration; an ``"out_in"`` weight of 3 or more axes (a PyTorch-layout
  convolution) is refused.
  """
  if declared not in (None, *ORIENTATIONS):
    raise ValueError(
      f"{transform}: `orientation` must be 'in_out', 'out_in' or None; got {declared!r}."
    )
  name = path.rsplit("/", 1)[-1]
  out_in = declared == "out_in" or (declared is None and name == "weight")
  if not out_in:
    return "in_out"
  if len(shape) != 2:
    raise ValueError(
      f"{transform}: leaf {path!r} of shape {tuple(shape)} is read as an [out, in, ...] "
      "weight; only 2-D [out, in] weights are supported in that orientation (a convolution "
      "needs a Flax-layout kernel [*window, in, out]); pass orientation='in_out' if it is one."
    )
  if declared is None:
    return _orientation(transform, path.rpartition("/")[0], name, shape, None)
  return "out_in"


class Layer(NamedTuple):
  """A selected dense layer: its path, its kernel and bias leaf paths and its orientation."""

  path: str
  kernel: str
  bias: str | None
  orientation: str | None  # None: the kernel is masked out (optax.masked)


def _orientation(transform: str, layer: str, name: str, shape: Any, declared: str | None) -> str:
  if declared is not None:
    return declared
  if name == "kernel":
    return "in_out"
  if shape[0] == shape[1]:
    raise ValueError(
      f"{transform}: layer {layer!r} has a square weight {tuple(shape)}, so its orientation "
      "cannot be told from its shape; pass orientation='out_in' (Equinox / PyTorch "
      "weight [out, in]) or orientation='in_out' (Flax kernel [in, out])."
    )
  return "out_in"


def find_layers(
  params: Any, selector: Selector, *, transform: str, orientation: str | None = None
) -> tuple[Layer, ...]:
  """The dense layers of ``params`` whose ``kernel`` / ``weight`` ``selector`` selects.

  Raises a ``ValueError`` naming ``transform`` and listing the layers found
  when the selector selects none, or when a selected kernel is not 2-D.
  """
  if orientation not in (None, *ORIENTATIONS):
    raise ValueError(
      f"{transform}: `orientation` must be 'in_out', 'out_in' or None; got {orientation!r}."
    )
  items = leaves_with_paths(params)
  paths = {p for p, _ in items}
  kernels = [(p, x) for p, x in items if p.rsplit("/", 1)[-1] in _KERNEL_NAMES]
  found = []
  for path, x in kernels:
    if not matches(selector, path, x):
      continue
    layer, _, name = path.rpartition("/")
    bias = f"{layer}/bias" if layer else "bias"
    bias = bias if bias in paths else None
    if _trees.is_masked(x):
      found.append(Layer(layer, path, bias, None))
      continue
    if np.ndim(x) != 2:
      raise ValueError(
        f"{transform}: selected layer {layer!r} has a {np.ndim(x)}-D {name} of shape "
        f"{np.shape(x)}; expected a dense layer (a 2-D kernel / weight)."
      )
    found.append(
      Layer(layer, path, bias, _orientation(transform, layer, name, np.shape(x), orientation))
    )
  if not found:
    available = sorted({p.rpartition("/")[0] for p, _ in kernels})
    raise ValueError(
      f"{transform}: the layer selector {selector!r} selects no dense layer; layers found "
      f"(paths of nodes with a kernel / weight): {available[:20]}; other leaves: "
      f"{sorted(paths - {p for p, _ in kernels})[:20]}."
    )
  return tuple(found)


def in_out(x: Any, layer: Layer) -> Any:
  """A kernel leaf as ``[in, out]`` (transposed when the layer is ``"out_in"``)."""
  return x.T if layer.orientation == "out_in" else x


def widths(params: Any, layer: Layer) -> tuple[int, int]:
  """``(in, out)`` of a layer's kernel in ``params``."""
  leaf = dict(leaves_with_paths(params))[layer.kernel]
  d_in, d_out = np.shape(in_out(np.empty(np.shape(leaf), bool), layer))
  return int(d_in), int(d_out)


def stored_shape(params: Any, layer: Layer) -> tuple[int, ...]:
  """The stored shape of a layer's kernel in ``params``."""
  return tuple(np.shape(dict(leaves_with_paths(params))[layer.kernel]))
