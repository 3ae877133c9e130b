"""Kronecker-factored precision for :func:`cl_optax.ncl`: merge, damping, checks.

A layer's precision is ``a (x) g`` (``a`` over the layer's inputs, the bias
folded in as a homogeneous coordinate; ``g`` over its outputs), as
:func:`cl_optax.importance.kfac_factors` estimates it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cl_optax import _checks, _trees

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


def leaf_roles(tree: Any, layers: Sequence[str]) -> list[tuple[str, str] | None]:
  """For each leaf (flatten order, MaskedNode as leaf): ``(layer, role)`` or None."""
  roles = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_trees.is_masked)[0]:
    names = _trees.path_names(path)
    prefix, last = "/".join(names[:-1]), names[-1] if names else ""
    roles.append((prefix, last) if prefix in layers and last in ("kernel", "bias") else None)
  return roles
