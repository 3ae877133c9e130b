r"""WSN (Kang et al., ICML 2022): the model-side mask and the per-task mask store.

WSN's optimiser side is :func:`cl_optax.freeze` (the OR of the past tasks'
masks, on the weights only; the scores stay free); this module holds what the
model needs: the top-c straight-through mask :func:`wsn_mask` and the
bit-packed per-task masks :class:`WSNMasks` used at inference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def wsn_kth(size: int, keep: float) -> int:
  r"""WSN's threshold rank :math:`k = 1 + \mathrm{round}(\rho\,(n - 1))`, :math:`\rho = 1 - c`.

  The mask keeps every entry with :math:`|s|` at or above the :math:`k`-th
  smallest (1-based), so :math:`n - k + 1` entries without ties (official
  ``networks/subnet.py`` ``GetSubnet``; Python's ``round``, half to even).

  Example:
    >>> import cl_optax
    >>> cl_optax.wsn_kth(100, 0.5), cl_optax.wsn_kth(100, 1.0), cl_optax.wsn_kth(100, 0.0)
    (51, 1, 100)
  """
  if not 0.0 <= keep <= 1.0:
    raise ValueError(f"wsn_mask: `keep` must be in [0, 1]; got {keep!r}.")
  return 1 + round((1.0 - keep) * (size - 1))


def _kth_smallest(mag: jax.Array, k: int) -> jax.Array:
  """The ``k``-th smallest (1-based) of the non-negative ``mag``, exactly.

  float32: a 31-step bisection over the bit patterns (for x >= 0 the int32 order is
  the float order): the smallest pattern with at least ``k`` entries at or below it
  is the ``k``-th value. 31 passes of compares instead of a sort of the leaf (40x
  faster on a 2-core CPU at 784 x 400). Other dtypes: a sort.
  """
  flat = mag.ravel()
  if flat.dtype != jnp.float32:
    return jnp.sort(flat)[k - 1]
  bits = jax.lax.bitcast_convert_type(flat, jnp.int32)

  def halve(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  top = jnp.int32(np.iinfo(np.int32).max)
  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), top))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _top(scores: jax.Array, k: int) -> jax.Array:
  mag = jnp.abs(scores)
  return (mag >= _kth_smallest(mag, k)).astype(scores.dtype)


def _top_fwd(scores, k):
  return _top(scores, k), jnp.sign(scores)


def _top_bwd(k, sign, g):
  return (sign * g,)


_top.defvjp(_top_fwd, _top_bwd)


def wsn_mask(scores: jax.Array, keep: float) -> jax.Array:
  r"""WSN's top-c mask over learnable scores, with a straight-through gradient.

  Forward: :math:`m = [\,|s| \ge |s|_{(k)}\,]` (0/1 in the scores' dtype),
  :math:`k` from :func:`wsn_kth` over the whole leaf, ties at the cutoff kept
  (the mask can hold more than a fraction ``keep``). Backward (straight
  through the absolute value, as the official ``GetSubnet``):
  :math:`\partial L/\partial s = \mathrm{sign}(s)\,\partial L/\partial m`.
  The layer uses :math:`m \odot W`, so :math:`\partial L/\partial W` is masked
  by :math:`m` through autodiff. ``keep`` :math:`c` is static (the official
  ``--sparsity``; 0.5 in the PMNIST script).

  Example:
    >>> import jax, jax.numpy as jnp, cl_optax
    >>> s = jnp.array([0.3, -0.9, 0.1, 0.5])
    >>> cl_optax.wsn_mask(s, 0.5)
    Array([0., 1., 0., 1.], dtype=float32)
    >>> jax.grad(lambda s: cl_optax.wsn_mask(s, 0.5).sum())(s)
    Array([ 1., -1.,  1.,  1.], dtype=float32)
  """
  scores = jnp.asarray(scores)
  return _top(scores, wsn_kth(int(np.size(scores)), float(keep)))


@jax.tree_util.register_pytree_node_class
class WSNMasks:
  """The per-task masks of WSN, bit-packed (8 entries a byte), one stack per masked leaf.

  Attributes:
    wsn_bits: a pytree like the masked weights, each leaf ``uint8
      [max_tasks, ceil(size / 8)]`` (``jnp.packbits`` of the flat mask).
    wsn_shapes: the weight shapes in leaf order (static, not a pytree leaf).
  """

  def __init__(self, wsn_bits: Any, wsn_shapes: Any):
    self.wsn_bits = wsn_bits
    self.wsn_shapes = wsn_shapes

  def tree_flatten(self):
    return (self.wsn_bits,), self.wsn_shapes

  @classmethod
  def tree_unflatten(cls, shapes, children):
    return cls(children[0], shapes)

  @staticmethod
  def create(like: Any, max_tasks: int) -> WSNMasks:
    """An empty store for ``max_tasks`` masks of the leaves of ``like`` (arrays or shapes)."""
    shapes = tuple(tuple(np.shape(x)) for x in jax.tree.leaves(like))
    bits = jax.tree.map(lambda x: jnp.zeros((max_tasks, -(-int(np.size(x)) // 8)), jnp.uint8), like)
    return WSNMasks(bits, shapes)

  def store(self, task: Any, masks: Any) -> WSNMasks:
    """Row ``task`` (0-based) set to ``masks`` (a bool / 0-1 pytree like the weights)."""
    bits = jax.tree.map(
      lambda b, m: b.at[task].set(jnp.packbits(jnp.asarray(m).ravel() > 0, bitorder="little")),
      self.wsn_bits,
      masks,
    )
    return WSNMasks(bits, self.wsn_shapes)

  def mask(self, task: Any) -> Any:
    """Task ``task``'s masks, ``bool`` leaves of the weights' shapes (jittable)."""
    leaves, treedef = jax.tree.flatten(self.wsn_bits)
    return treedef.unflatten(
      [
        jnp.unpackbits(b[task], count=int(np.prod(shape)), bitorder="little")
        .astype(jnp.bool_)
        .reshape(shape)
        for b, shape in zip(leaves, self.wsn_shapes, strict=True)
      ]
    )

  def used(self, task: Any) -> Any:
    """The fraction of each leaf's entries task ``task``'s mask uses (its capacity)."""
    return jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32)), self.mask(task))
