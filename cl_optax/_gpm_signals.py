"""GPM's ``consolidate`` signals: ``representations=`` and ``threshold=`` matched to the kernels
(:func:`layer_signals`, shared by GPM, SGP, Adam-NSCL and TRGP).

A signal names a projected kernel by the parameter's key string or by its
``/``-joined path (:func:`by_path`); a convolution kernel takes only the
:class:`cl_optax.ConvRepresentations` built for its shape (:func:`layer_inputs`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cl_optax import _checks, _trees
from cl_optax._conv import ConvRepresentations


def _is_conv(x: Any) -> bool:
  return isinstance(x, ConvRepresentations)


def by_path(tree: Any, aliases: dict[str, str] | None = None) -> dict[str, Any]:
  """``{key path: leaf}`` of a signal tree (a :class:`ConvRepresentations` is one leaf).

  ``aliases`` maps a ``/``-joined path to the key string of the parameter
  there, so a signal may be given in another container (``{"layers/0/weight":
  x}`` or nested dicts for an Equinox model's ``.layers[0].weight``).
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_conv)
  aliases = aliases or {}
  return {aliases.get(_trees.leaf_path(p), _trees.key_string(p)): x for p, x in leaves}


def kernel_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """``{key path: shape}`` of the parameters (empty without them)."""
  if params is None:
    return {}
  return {p: tuple(np.shape(x)) for p, x in by_path(params).items()}


def representations_by_path(
  rep_by_path: dict[str, Any], basis_paths: list[str], unprojected: list[str]
) -> dict[str, Any]:
  """The ``representations`` leaves by path, exactly one per projected leaf.

  Paths of parameters the transform does not project (``unprojected``, e.g.
  masked out by ``optax.masked``) are ignored; any other path is an error.
  """
  missing = [p for p in basis_paths if p not in rep_by_path]
  extra = [
    p for p in rep_by_path if p not in basis_paths and not any(p.startswith(u) for u in unprojected)
  ]
  if missing or extra:
    raise ValueError(
      f"gpm: `representations` must hold one [n, d_in] array at the path of each "
      f"projected leaf; expected paths {basis_paths}, got {sorted(rep_by_path)} "
      f"(missing {missing}, unexpected {extra})."
    )
  return rep_by_path


def thresholds_by_path(thr_by_path: Any, basis_paths: list[str]) -> dict[str, Any]:
  """The per-layer ``threshold`` signal by path (empty without one), a subset of the leaves."""
  if thr_by_path is None:
    return {}
  unknown = [p for p in thr_by_path if p not in basis_paths]
  if unknown:
    raise ValueError(
      f"gpm: `threshold` has paths {unknown} that are not projected leaves "
      f"(expected a subset of {basis_paths})."
    )
  return thr_by_path


def _conv_width(kernel_shape: tuple[int, ...]) -> str:
  """``"kh*kw*c_in = 3*3*2 = 18"``: a conv kernel's input width, spelled out."""
  names = ["kd", "kh", "kw"][-(len(kernel_shape) - 2) :] if len(kernel_shape) <= 5 else []
  names = names or [f"k{i}" for i in range(len(kernel_shape) - 2)]
  dims = kernel_shape[:-1]
  return f"{'*'.join([*names, 'c_in'])} = {'*'.join(str(d) for d in dims)} = {int(np.prod(dims))}"


_HOW = (
  "build them with cl_optax.conv_representations(x, kernel.shape, strides=..., padding=..., "
  "dilation=...)"
)


def layer_inputs(path: str, x: Any, d_in: int, kernel_shape: tuple[int, ...] | None) -> jax.Array:
  """A layer's inputs ``[n, d_in]`` (float32) from ``[n, d_in]`` or ``[n, *in_shape]``, or a
  convolution's patches from a :class:`ConvRepresentations` built for its kernel.

  A kernel with more than one input axis (a convolution's ``(*window, c_in, c_out)``) takes
  only a :class:`ConvRepresentations` of its own shape: a plain array's feature order cannot
  be checked, and patches ordered ``(c_in, *window)`` have the right width.
  """
  conv_kernel = kernel_shape is not None and len(kernel_shape) >= 3
  if isinstance(x, ConvRepresentations):
    if kernel_shape is not None and not conv_kernel:
      raise ValueError(
        f"gpm: `representations` leaf {path} holds convolution patches (built for a kernel "
        f"of shape {x.kernel_shape}) but the parameter there has shape {kernel_shape}; a "
        f"dense kernel takes its layer's inputs as an array [n, {d_in}]."
      )
    if conv_kernel and tuple(x.kernel_shape) != tuple(kernel_shape or ()):
      raise ValueError(
        f"gpm: `representations` leaf {path} holds patches built for a kernel of shape "
        f"{x.kernel_shape}, but the kernel there has shape {kernel_shape} (width "
        f"{_conv_width(kernel_shape or ())}); {_HOW} with that layer's inputs."
      )
    width = int(np.prod(x.kernel_shape[:-1]))
    if np.ndim(x.patches) != 2 or np.shape(x.patches)[1] != width or width != d_in:
      raise ValueError(
        f"gpm: `representations` leaf {path} holds patches of shape {np.shape(x.patches)} "
        f"for a kernel of shape {x.kernel_shape}; expected (n, {d_in}); {_HOW}."
      )
    x = x.patches
  elif conv_kernel:
    assert kernel_shape is not None
    raise ValueError(
      f"gpm: `representations` leaf {path} is a plain array of shape {np.shape(x)} for the "
      f"convolution kernel of shape {kernel_shape}: the order of its features cannot be "
      f"checked (the kernel's rows are ordered (*window, c_in); "
      f"jax.lax.conv_general_dilated_patches orders a patch (c_in, *window)). Expected the "
      f"patches [n, {_conv_width(kernel_shape)}] as a ConvRepresentations: {_HOW}."
    )
  if np.ndim(x) < 2 or int(np.prod(np.shape(x)[1:])) != d_in:
    raise ValueError(
      f"gpm: `representations` leaf {path} has shape {np.shape(x)}; expected "
      f"(n, {d_in}) (or (n, *in_shape)): the inputs of that layer at n samples."
    )
  x = jnp.reshape(jnp.asarray(x, jnp.float32), (np.shape(x)[0], d_in))
  _checks.check_finite(x, transform="gpm", name="representations", leaf=path)
  return x


def checked_threshold(path: str, thr: Any) -> Any:
  """``thr``, checked to lie in [0, 1] where it is concrete."""
  if _checks.is_concrete(thr) and not 0.0 <= float(thr) <= 1.0:
    raise ValueError(f"gpm: threshold for {path} is {float(thr)}; expected a value in [0, 1].")
  return thr


def layer_signals(basis: Any, params: Any, signals: dict, default_threshold: Any, transform: str):
  """``[(inputs [n, d_in], threshold)]`` per projected leaf of ``basis`` (its unmasked leaves)."""
  reps = _checks.require_signal(
    signals,
    "representations",
    transform,
    "a pytree holding, at the path of each projected kernel leaf, the layer's "
    "input activations [n, d_in] at n samples of the task (for a convolution kernel, "
    "cl_optax.conv_representations(x, kernel.shape, ...))",
  )
  thresholds = signals.get("threshold")
  basis_paths = _trees.unmasked_key_strings(basis)
  unprojected = [p for p in _trees.key_strings(basis) if p not in basis_paths]
  aliases = dict(zip(_trees.leaf_paths(basis), _trees.key_strings(basis)))
  rep_by_path = representations_by_path(by_path(reps, aliases), basis_paths, unprojected)
  shapes = kernel_shapes(params)
  thr = None if thresholds is None else by_path(thresholds, aliases)
  thr_by_path = thresholds_by_path(thr, basis_paths)
  out = []
  for path, b in zip(basis_paths, _trees.unmasked_leaves(basis), strict=True):
    x = layer_inputs(path, rep_by_path[path], b.shape[0], shapes.get(path))
    t = checked_threshold(path, thr_by_path.get(path, default_threshold))
    out.append((x, jnp.asarray(t, jnp.float32)))
  return out
