r"""A convolution's input patches in its kernel's own feature order (GPM's conv representations)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ConvRepresentations:
  """The input patches of a convolution, tagged with the kernel they belong to.

  Built by :func:`conv_representations`; :func:`cl_optax.gpm` takes one at the
  path of each convolution kernel it projects and checks ``kernel_shape``
  against that kernel, so patches whose features are in another order (or of
  another layer) cannot reach the basis. A pytree: ``patches`` is its only
  child, ``kernel_shape`` is static, so it passes through ``jit``.

  Attributes:
    patches: ``[n_patches, prod(window) * c_in]``, one row per output position
      of every example, its features ordered like ``kernel.reshape(-1, c_out)``
      (window axes first, then input channels).
    kernel_shape: the kernel shape ``(*window, c_in, c_out)`` the patches were
      built for.
  """

  patches: jax.Array
  kernel_shape: tuple[int, ...]


jax.tree_util.register_dataclass(
  ConvRepresentations, data_fields=["patches"], meta_fields=["kernel_shape"]
)


def _tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
  """``value`` as ``n`` positive ints (an int repeats)."""
  out = (value,) * n if isinstance(value, int | np.integer) else tuple(value)
  if len(out) != n or not all(isinstance(v, int | np.integer) and v >= 1 for v in out):
    raise ValueError(
      f"conv_representations: `{name}` must be a positive int or {n} positive ints "
      f"(one per spatial axis); got {value!r}."
    )
  return tuple(int(v) for v in out)


def _pads(
  padding: Any, spatial: tuple[int, ...], window: tuple[int, ...], strides: tuple[int, ...]
) -> list[tuple[int, int]]:
  """Low and high zero padding per spatial axis, as ``lax.conv_general_dilated`` reads it."""
  n = len(spatial)
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(
        f"conv_representations: `padding` {padding!r} is not supported; expected 'SAME', "
        "'VALID', an int or one (low, high) pair per spatial axis (for Flax's 'CIRCULAR' or "
        "'CAUSAL', pad the inputs yourself and pass 'VALID')."
      )
    pads = jax.lax.padtype_to_pads(spatial, window, strides, padding.upper())
    return [(int(lo), int(hi)) for lo, hi in pads]
  if isinstance(padding, int | np.integer):
    return [(int(padding), int(padding))] * n
  pads = [tuple(p) if isinstance(p, Sequence) else (p, p) for p in padding]
  if len(pads) != n or not all(
    len(p) == 2 and all(isinstance(v, int | np.integer) for v in p) for p in pads
  ):
    raise ValueError(
      f"conv_representations: `padding` must be 'SAME', 'VALID', an int or {n} (low, high) "
      f"pairs of ints; got {padding!r}."
    )
  return [(int(lo), int(hi)) for lo, hi in pads]


def _checked_inputs(x, kernel_shape) -> tuple[tuple[int, ...], jax.Array]:
  """``(kernel_shape as ints, x as an array)``; raises on a bad kernel shape or input."""
  kernel_shape = tuple(int(k) for k in kernel_shape)
  if len(kernel_shape) < 3 or min(kernel_shape) < 1:
    raise ValueError(
      "conv_representations: `kernel_shape` must be a convolution kernel's full shape "
      f"(*window, c_in, c_out) with positive entries, e.g. (3, 3, c_in, c_out); got {kernel_shape}."
    )
  n_spatial = len(kernel_shape) - 2
  c_in = kernel_shape[-2]
  x = jnp.asarray(x)
  if x.ndim != n_spatial + 2:
    raise ValueError(
      f"conv_representations: `x` must be [n, *spatial, c_in] with {n_spatial} spatial "
      f"axes for a kernel of shape {kernel_shape}; got shape {x.shape}."
    )
  if x.shape[-1] != c_in:
    grouped = x.shape[-1] % c_in == 0 and x.shape[-1] > c_in
    raise ValueError(
      f"conv_representations: `x` has {x.shape[-1]} input channels (its last axis) but the "
      f"kernel {kernel_shape} reads c_in = {c_in}"
      + (
        f" (a grouped convolution, feature_group_count = {x.shape[-1] // c_in}, is not "
        "supported: its kernel's rows are not one patch's features)."
        if grouped
        else "; inputs must be channels-last (NHWC) with the kernel in (*window, c_in, c_out)."
      )
    )
  return kernel_shape, x


def conv_representations(
  x: jax.Array,
  kernel_shape: Sequence[int],
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[Any] = "SAME",
  dilation: int | Sequence[int] = 1,
) -> ConvRepresentations:
  r"""A convolution layer's representations for :func:`cl_optax.gpm`: its input patches.

  A convolution is a dense layer applied at every output position to the
  patch of input it reads: with a kernel :math:`W` of shape
  ``(*window, c_in, c_out)`` (channels-last, as Flax's ``nnx.Conv`` and linen
  ``Conv`` store it) and ``W2 = W.reshape(-1, c_out)``,

  .. math::
    \mathrm{conv}(x, W)[b, o, :] = P_{b,o} W_2 ,

  where the row :math:`P_{b,o}` holds the input entries under the window at
  output position :math:`o` of example :math:`b` (zero where the window
  crosses the padding), flattened in the order of ``W2``'s rows: window axes
  first, then input channels (``(kh, kw, c_in)`` for a 2-D kernel). This
  function returns all rows :math:`P`; they are the inputs GPM's basis is
  grown from for that layer (Saha et al., 2021, Sec. 4: the layer's
  representation matrix for a convolution is built from its input patches).

  ``jax.lax.conv_general_dilated_patches`` orders a patch's features
  ``(c_in, *window)`` instead, and a basis grown from those protects the wrong
  subspace while having the right width; the typed result carries the kernel
  shape so that :func:`cl_optax.gpm` can refuse patches that were not built
  here for that kernel.

  ``n_patches = n * prod(output spatial shape)`` can be large: subsample the
  examples (GPM's official code uses 125 per task for its conv layers) or the
  rows (``ConvRepresentations(reps.patches[idx], reps.kernel_shape)``) before
  :func:`cl_optax.consolidate`; GPM's SVD costs ``O(d_in^2 n_patches)``.

  Args:
    x: the layer's inputs ``[n, *spatial, c_in]`` (channels-last, NHWC for a
      2-D convolution).
    kernel_shape: the layer's full kernel shape ``(*window, c_in, c_out)``,
      e.g. ``model.conv.kernel.shape``; its length sets the number of
      spatial axes (1-D, 2-D, 3-D convolutions).
    strides: the window strides, one int for every axis or one per axis.
    padding: ``"SAME"``, ``"VALID"``, an int (the same on every side) or one
      ``(low, high)`` pair per spatial axis, as ``jax.lax.conv_general_dilated``
      and Flax's ``Conv`` read them.
    dilation: the kernel dilation (Flax's ``kernel_dilation``).

  Returns:
    A :class:`ConvRepresentations` with ``patches``
    ``[n_patches, prod(window) * c_in]`` (the dtype of ``x``) and the
    ``kernel_shape``.

  Raises:
    ValueError: ``x`` of the wrong rank, input channels that do not match the
      kernel (a grouped convolution, ``feature_group_count > 1``, is not
      supported), or a bad stride, padding or dilation.

  References:
    Saha, Garg, Roy, *Gradient Projection Memory for Continual Learning*,
    ICLR 2021 (arXiv:2103.09762), Sec. 4 and App. C; official code
    sahagobinda/GPM ``main_five_datasets.py`` / ``main_cifar100.py``
    ``get_representation_matrix`` (patches of the padded input).

  Example:
    >>> import jax, jax.numpy as jnp, cl_optax
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))  # NHWC
    >>> kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))  # HWIO
    >>> reps = cl_optax.conv_representations(x, kernel.shape, padding="SAME")
    >>> reps.patches.shape  # 2 * 5 * 5 positions, 3 * 3 * 3 features
    (50, 27)
    >>> y = jax.lax.conv_general_dilated(
    ...     x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> bool(jnp.allclose(reps.patches @ kernel.reshape(-1, 4), y.reshape(-1, 4), atol=1e-4))
    True
  """
  kernel_shape, x = _checked_inputs(x, kernel_shape)
  n_spatial = len(kernel_shape) - 2
  window, c_in = kernel_shape[:n_spatial], kernel_shape[-2]
  strides = _tuple(strides, n_spatial, "strides")
  dilation = _tuple(dilation, n_spatial, "dilation")
  spatial = tuple(x.shape[1:-1])
  span = tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))
  pads = _pads(padding, spatial, span, strides)
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = tuple(
    (s + lo + hi - w) // st + 1
    for s, (lo, hi), w, st in zip(spatial, pads, span, strides, strict=True)
  )
  if min(out) < 1:
    raise ValueError(
      f"conv_representations: the (dilated) window {span} does not fit the padded input "
      f"{tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pads, strict=True))}."
    )
  n = x.shape[0]
  # One strided slice per window offset, stacked in the kernel's row order (window, c_in).
  cols = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0, *(o * d for o, d in zip(offset, dilation, strict=True)), 0)
    limit = (
      n,
      *(s + (o - 1) * st + 1 for s, o, st in zip(start[1:-1], out, strides, strict=True)),
      c_in,
    )
    cols.append(jax.lax.slice(xp, start, limit, (1, *strides, 1)))
  patches = jnp.stack(cols, axis=-2)  # [n, *out, prod(window), c_in]
  return ConvRepresentations(
    patches=patches.reshape(n * int(np.prod(out)), len(cols) * c_in), kernel_shape=kernel_shape
  )
