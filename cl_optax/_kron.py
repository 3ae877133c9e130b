"""Kronecker-factored precision for :func:`cl_optax.ncl`: checks, merge, damping and the step.

A layer's precision is ``a (x) g`` (``a`` over the layer's inputs, the bias
folded in as a homogeneous coordinate; ``g`` over its outputs), as
:func:`cl_optax.importance.kfac_factors` estimates it. The diagonal step and
the state live in ``_ncl.py``; the scalars and leaves of a step
(:class:`StepCoefficients`, :class:`StepLeaves`) are shared by both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _select, _trees

_EIG_FLOOR = 1e-9  # relative floor on damped eigenvalues (as reginv(.., 1e-9) in tachukao/ncl)


class NCLKron(NamedTuple):
  """Per-layer Kronecker state of :func:`ncl`: precision ``a (x) g`` and damped inverses."""

  a: jax.Array  # [in(+1), in(+1)]
  g: jax.Array  # [out, out]
  a_inv: jax.Array  # (a + alpha/pi I)^-1
  g_inv: jax.Array  # (g + alpha pi I)^-1


def check_factors(name: str, factors: Any, old: NCLKron) -> tuple[jax.Array, jax.Array]:
  """``factors`` as float32 ``(a, g)``, checked against the state's factors of layer ``name``."""
  try:
    a, g = factors
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"ncl: `precision[{name!r}]` must be KronFactors(a, g); got {type(factors).__name__}."
    ) from e
  a, g = jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)
  for what, x, ref in (("a", a, old.a), ("g", g, old.g)):
    if x.shape != ref.shape:
      raise ValueError(
        f"ncl: `precision[{name!r}].{what}` has shape {x.shape}; expected {ref.shape}."
      )
    _checks.check_finite(x, transform="ncl", name=f"precision[{name!r}].{what}")
    if not _checks.is_concrete(x):
      continue
    m = np.asarray(x, np.float64)
    if not np.all(np.isfinite(m)):
      raise ValueError(f"ncl: `precision[{name!r}].{what}` holds non-finite values.")
    scale = max(float(np.abs(m).max()), 1e-30)
    if np.abs(m - m.T).max() > 1e-4 * scale:
      raise ValueError(f"ncl: `precision[{name!r}].{what}` is not symmetric.")
    low = float(np.linalg.eigvalsh(m).min()) if m.size else 0.0
    if low < -1e-4 * scale:
      raise ValueError(
        f"ncl: `precision[{name!r}].{what}` has a negative eigenvalue {low:g}; "
        "expected a positive semi-definite Kronecker factor (a precision)."
      )
  return a, g


def nearest_kron_sum(
  a1: jax.Array, g1: jax.Array, a2: jax.Array, g2: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""``a1 (x) g1 + a2 (x) g2 ~= (a1 + a2 / pi) (x) (g1 + pi g2)`` (trace heuristic).

  :math:`\pi = \sqrt{\mathrm{tr}(g_1)\,\mathrm{tr}(a_2) / (\mathrm{tr}(g_2)\,
  \mathrm{tr}(a_1))}` (Martens & Grosse 2015, Sec. 6.3; official NCL code
  ``additive_nearest_kf``). A term with a zero trace is dropped.
  """
  ta1, tg1, ta2, tg2 = (jnp.trace(m) for m in (a1, g1, a2, g2))
  ok1 = (ta1 > 0) & (tg1 > 0)
  ok2 = (ta2 > 0) & (tg2 > 0)
  pi = jnp.sqrt(jnp.where(ok1 & ok2, tg1 * ta2 / jnp.where(ok1 & ok2, tg2 * ta1, 1.0), 1.0))
  a = jnp.where(ok1 & ok2, a1 + a2 / pi, jnp.where(ok2, a2, a1))
  g = jnp.where(ok1 & ok2, g1 + pi * g2, jnp.where(ok2, g2, g1))
  return a, g


def damped_inverses(a: jax.Array, g: jax.Array, damping: Any) -> tuple[jax.Array, jax.Array]:
  r"""Inverses of ``a + alpha / pi I`` and ``g + alpha pi I`` by eigendecomposition.

  The nearest Kronecker product of :math:`a \otimes g + \alpha I \otimes \alpha I`
  (the official code's split of the damping :math:`\alpha^2 I` between the
  factors, :func:`nearest_kron_sum`). Eigenvalues are clipped at 0 and floored
  relative to the largest one, so a singular factor with ``damping = 0`` still
  gives a finite inverse.
  """

  def inv(m, d):
    w, q = jnp.linalg.eigh(m)
    w = jnp.maximum(w, 0.0) + d
    w = jnp.maximum(w, _EIG_FLOOR * jnp.max(w) + 1e-30)
    return (q / w) @ q.T

  alpha = jnp.asarray(damping, jnp.float32)
  da, dg = a.shape[0], g.shape[0]
  ra, rg = jnp.trace(a) / da, jnp.trace(g) / dg
  pi = jnp.sqrt(jnp.where((ra > 0) & (rg > 0), rg / jnp.where(ra > 0, ra, 1.0), 1.0))
  return inv(a, alpha / pi), inv(g, alpha * pi)


def is_factors(x: Any) -> bool:
  """Whether ``x`` is a ``KronFactors(a, g)`` (any ``NamedTuple`` with fields ``a, g``)."""
  return isinstance(x, tuple) and getattr(x, "_fields", None) == ("a", "g")


def leaf_names(tree: Any) -> list[str]:
  """The path of every leaf (flatten order; ``MaskedNode`` and ``KronFactors`` are leaves)."""
  return _trees.leaf_paths(tree, is_leaf=lambda x: _trees.is_masked(x) or is_factors(x))


def lookup_factors(tree: Any, name: str) -> Any:
  """``tree[name]``, or the node at the ``/``-separated path ``name``."""
  if hasattr(tree, "__getitem__") and not isinstance(tree, tuple):
    with contextlib.suppress(TypeError):  # a tree that is not a mapping
      if name in tree:
        return tree[name]
  node: Any = tree
  try:
    for k in name.split("/"):
      node = node[k]
  except (KeyError, TypeError, IndexError) as e:
    raise ValueError(
      f"ncl: `precision` has no KronFactors(a, g) for layer {name!r} (expected "
      "{layer: KronFactors} as importance.kfac_factors returns, plus diagonal leaves "
      "for parameters outside the layers)."
    ) from e
  return node


def kron_layout(
  tree: Any, layers: Any, orientation: str | None
) -> tuple[list[tuple[str, str] | None], tuple[_select.Layer, ...]]:
  """The roles of ``tree``'s leaves (:func:`leaf_roles`) and its dense layers, for :func:`ncl`."""
  found = _select.find_layers(tree, layers, transform="ncl", orientation=orientation)
  return leaf_roles(tree, found), found


def leaf_roles(tree: Any, layers: Sequence[_select.Layer]) -> list[tuple[str, str] | None]:
  """For each leaf (flatten order, MaskedNode as leaf): ``(layer, "kernel" | "bias")`` or None."""
  role = {ly.kernel: (ly.path, "kernel") for ly in layers}
  role.update({ly.bias: (ly.path, "bias") for ly in layers if ly.bias is not None})
  return [role.get(path) for path, _ in _select.leaves_with_paths(tree)]


# ------------------------------------------------------------ init and step


class StepCoefficients(NamedTuple):
  """The scalars of a step: :math:`\\alpha^2`, :math:`\\lambda`, :math:`N` and the options."""

  alpha2: jax.Array
  lam: jax.Array
  n: jax.Array
  precondition_penalty: bool
  with_norm: bool  # whether the trust-region norm is needed (``radius`` given)


class StepLeaves(NamedTuple):
  """Flattened updates, params, prior mean and diagonal precision (``MaskedNode`` as leaf)."""

  updates: list
  params: list
  mean: list
  precision: list


def _row_blocks(leaves: list, rows: list[int], transposed: bool) -> list[jax.Array]:
  """A Kronecker layer's rows: ``[kernel [in, out]]`` or ``[kernel, bias [1, out]]`` (float32).

  An ``"out_in"`` weight (``transposed``) is read as its transpose.
  """
  kernel = jnp.asarray(leaves[rows[0]], jnp.float32)
  blocks = [kernel.T if transposed else kernel]
  if len(rows) > 1:
    blocks.append(jnp.asarray(leaves[rows[1]], jnp.float32)[None])
  return blocks


def _left(m: jax.Array, blocks: list[jax.Array]) -> list:
  """``m @ concatenate(blocks)`` as row blocks, without concatenating.

  Appending the bias row to a kernel whose rows are sharded would gather the
  kernel on every device; block products keep it sharded (a replicated
  factor times a sharded block is local work plus a reduction).
  """
  edges = np.cumsum([0] + [b.shape[0] for b in blocks])
  return [
    sum(m[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] @ b for c, b in enumerate(blocks))
    for r in range(len(blocks))
  ]


def prior_diagonal(x: jax.Array, n: jax.Array, dtype: Any) -> jax.Array:
  """:math:`\\Lambda_0 = I / N` at one leaf, stored as ``dtype``."""
  return (jnp.ones_like(x, dtype=jnp.float32) / n).astype(dtype)


def init_kron(
  params: optax.Params, selection: tuple[Any, str | None], n: jax.Array, damping: float, dtype: Any
) -> tuple[dict[str, NCLKron], optax.Params]:
  """Kronecker precision: :math:`A_0 = G_0 = I/\\sqrt N` per layer, and the
  diagonal :math:`I/N` at the leaves outside the layers (``MaskedNode`` inside).

  ``selection`` is ``(layers selector, orientation)`` as :func:`ncl` takes them.
  """
  layers = kron_layout(params, *selection)[1]
  # A layer masked out by optax.masked / partition is not kept (the transform passes it).
  kept = [layer for layer in layers if layer.orientation is not None]
  kron = {}
  for layer in kept:
    d_in, d_out = _select.widths(params, layer)
    d_in += 1 if layer.bias is not None else 0
    a = jnp.eye(d_in, dtype=jnp.float32) / jnp.sqrt(n)
    g = jnp.eye(d_out, dtype=jnp.float32) / jnp.sqrt(n)
    kron[layer.path] = NCLKron(a, g, *damped_inverses(a, g, damping))
  roles = leaf_roles(params, kept)
  leaves, treedef = jax.tree.flatten(params, is_leaf=_trees.is_masked)
  prec = treedef.unflatten(
    [
      optax.MaskedNode() if r is not None or _trees.is_masked(x) else prior_diagonal(x, n, dtype)
      for r, x in zip(roles, leaves)
    ]
  )
  return kron, prec


def _kron_direction(k: NCLKron, g: list, diff: list, c: StepCoefficients) -> list[jax.Array]:
  """:math:`\\delta` of one Kronecker layer as row blocks: :math:`A_s^{-1}\\,\\bar g\\,G_s^{-1}`
  plus the pull (or the whole regularised gradient preconditioned).
  """
  if c.precondition_penalty:
    inner = [gi + c.lam * (x @ k.g) for gi, x in zip(g, _left(k.a, diff))]
    return [x @ k.g_inv / c.n for x in _left(k.a_inv, inner)]
  return [(x @ k.g_inv + c.lam * di) / c.n for x, di in zip(_left(k.a_inv, g), diff)]


def _layer_rows(roles: list, name: str) -> list[int]:
  """Flatten-order positions of layer ``name``'s ``[kernel]`` or ``[kernel, bias]`` leaves."""
  idx = {r[1]: i for i, r in enumerate(roles) if r is not None and r[0] == name}
  ik, ib = idx["kernel"], idx.get("bias")
  return [ik] if ib is None else [ik, ib]


def kron_directions(
  out: list,
  leaves: StepLeaves,
  kron: dict[str, NCLKron],
  layout: tuple[list, tuple[_select.Layer, ...]],
  c: StepCoefficients,
) -> list[jax.Array]:
  """Writes :math:`\\delta` of every Kronecker layer into ``out``; returns the layers'
  squared :math:`\\Lambda`-norms when ``c.with_norm``.

  A non-finite gradient entry would spread over the layer through the matmuls,
  so such a layer passes its gradient unchanged and stays out of the norm.
  """
  sq_norms = []
  roles, layers = layout
  transposed = {layer.path: layer.orientation == "out_in" for layer in layers}
  for name, k in kron.items():
    rows, t = _layer_rows(roles, name), transposed[name]
    g = _row_blocks(leaves.updates, rows, t)
    diff = [
      x - y for x, y in zip(_row_blocks(leaves.params, rows, t), _row_blocks(leaves.mean, rows, t))
    ]
    d = _kron_direction(k, g, diff, c)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in g]))
    if c.with_norm:
      norm2 = sum(jnp.sum(x * (y @ k.g)) for x, y in zip(d, _left(k.a, d)))
      sq_norms.append(jnp.where(finite, norm2, 0.0))
    out[rows[0]] = jnp.where(finite, d[0], g[0]).T if t else jnp.where(finite, d[0], g[0])
    if len(rows) > 1:
      out[rows[1]] = jnp.where(finite, d[1][0], g[1][0])
  return sq_norms
