"""OGD: orthogonal gradient descent (Farajtabar et al., 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._gram_schmidt import gram_schmidt_add
from cl_optax._linalg import contract


class OGDState(NamedTuple):
  """State of :func:`ogd`.

  Attributes:
    basis: orthonormal directions in blocks: a tuple of pytrees like params
      whose leaves have a leading axis of ``block_size`` rows (the last block
      holds the remainder of ``max_directions``); rows past ``basis_count`` are
      0. :meth:`stacked_basis` gives them as one ``[max_directions, ...]`` tree.
    basis_count: number of directions stored (int32).
    basis_dropped: independent directions that did not fit in the buffer
      (int32; only a ``consolidate`` traced under ``jit`` can leave it > 0,
      an eager one raises instead).
    ogd_rtol: a candidate whose residual norm after Gram-Schmidt is below
      ``ogd_rtol`` times its norm is taken as already in the span and skipped;
      refreshed from the factory argument at every update.
  """

  TRANSFORM = "ogd"
  SIGNALS = ("output_grads",)
  EXTRA_ARGS = ()

  basis: Any
  basis_count: jax.Array  # shape=(), int32
  basis_dropped: jax.Array  # shape=(), int32
  ogd_rtol: jax.Array  # shape=(), float32

  def stacked_basis(self) -> Any:
    """The basis as one pytree like params with leaves ``[max_directions, *shape]``."""
    if len(self.basis) == 1:
      return self.basis[0]
    return _trees.map_unmasked(lambda *blocks: jnp.concatenate(blocks), *self.basis)

  def consolidate(self, params: optax.Params, **signals: Any) -> OGDState:
    """Adds the task's ``output_grads`` to the basis (Gram-Schmidt, twice)."""
    del params
    grads = _checks.validated_signal(
      signals,
      "output_grads",
      self.basis[0],
      transform="ogd",
      rows=True,
      what="a pytree like params whose leaves have a leading axis of size n: the gradients "
      "of the model outputs at n stored samples, e.g. from cl_optax.importance.output_gradients",
    )
    stacked = self.stacked_basis()
    b_leaves = _trees.unmasked_leaves(stacked)
    g_leaves = _trees.unmasked_leaves(grads)
    if not b_leaves:
      return self
    _checks.check_finite(grads, transform="ogd", name="output_grads")
    basis, count, dropped = gram_schmidt_add(
      b_leaves, self.basis_count, self.basis_dropped, g_leaves, self.ogd_rtol
    )
    if _trees.is_concrete(dropped) and int(dropped) > int(self.basis_dropped):
      cap = int(np.shape(b_leaves[0])[0])
      raise ValueError(
        f"ogd: the basis is full: max_directions={cap} holds {int(self.basis_count)} "
        f"directions and this task brings {int(dropped) - int(self.basis_dropped)} more "
        "independent ones than fit. Raise max_directions, or pass fewer output "
        "gradients per task."
      )
    blocks, start = [], 0
    for block in self.basis:
      rows = int(np.shape(_trees.unmasked_leaves(block)[0])[0])
      blocks.append(_trees.replace_unmasked(block, [b[start : start + rows] for b in basis]))
      start += rows
    return self._replace(basis=tuple(blocks), basis_count=count, basis_dropped=dropped)


def _block_rows(max_directions: int, block_size: int) -> tuple[int, ...]:
  """Rows per block: ``block_size`` each, the last one the remainder."""
  full, rest = divmod(int(max_directions), int(block_size))
  return (int(block_size),) * full + ((rest,) if rest else ())


def _project(
  leaves: list[jax.Array], blocks: list[list[jax.Array]], starts: list[int], count: jax.Array
) -> list[jax.Array]:
  """``g - Bᵀ(B g)`` over the filled blocks; ``g`` unchanged if a dot product is not finite.

  One ``lax.cond`` per block computes both of its products, ``c = B_j g`` and
  ``acc - B_jᵀ c``, one after the other (a block that stays in the cache is
  read from memory once); the blocks past ``count`` are never read. The
  directions are orthonormal, so the sum over blocks is the projection.
  """
  u = [x.astype(jnp.float32) for x in leaves]

  def project(carry, rows):
    acc, ok = carry
    c = sum(contract(b.astype(jnp.float32), x, x.ndim) for b, x in zip(rows, u))
    acc = [a - jnp.tensordot(c, b.astype(jnp.float32), axes=1) for a, b in zip(acc, rows)]
    return acc, ok & jnp.all(jnp.isfinite(c))

  carry = (u, jnp.asarray(True))
  for rows, start in zip(blocks, starts):
    carry = jax.lax.cond(start < count, project, lambda carry, rows: carry, carry, rows)
  new, ok = carry
  return [jnp.where(ok, y.astype(x.dtype), x) for y, x in zip(new, leaves)]


def ogd(
  max_directions: int, *, rtol: float = 1e-4, basis_dtype: Any = None, block_size: int | None = None
) -> optax.GradientTransformationExtraArgs:
  r"""OGD: orthogonal gradient descent (Farajtabar et al., 2020).

  Keeps an orthonormal basis :math:`S` of gradients of the model's outputs at
  samples of past tasks and removes their span from the gradient:

  .. math::
    \tilde g = g - \sum_{v \in S} \langle g, v \rangle\, v,

  with dot products over the whole pytree. :func:`cl_optax.consolidate` with
  ``output_grads=`` (leaves ``[n, *leaf.shape]``: the gradient of an output at
  each of ``n`` stored samples, see
  :func:`cl_optax.importance.output_gradients`; the paper's
  default is the ground-truth logit) adds them one by one by Gram-Schmidt
  with re-orthogonalisation, skipping the ones already in the span.

  The buffer has a fixed capacity ``max_directions`` (memory is
  ``max_directions`` times the model), stored in blocks of ``block_size``
  rows: ``update`` reads only the blocks that hold directions (a ``lax.cond``
  per block), so a step costs in proportion to the directions stored, not to
  the capacity. A consolidate whose new independent directions do not fit
  raises a ``ValueError`` (nothing is truncated silently); traced under ``jit``
  it cannot raise, and it counts the directions left out in ``basis_dropped``
  instead.

  Args:
    max_directions: capacity of the basis (static; under
      ``optax.inject_hyperparams`` list it in ``static_args``).
    rtol: relative residual norm under which a candidate counts as dependent.
    basis_dtype: storage dtype of the basis (float32 when ``None``).
    block_size: rows per block of the basis (static: under
      ``optax.inject_hyperparams`` list it in ``static_args``); a block is read
      only once it holds a direction. ``None`` is 200, the paper's number of
      stored gradients per task.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Farajtabar, Azizan, Mott, Li, *Orthogonal Gradient Descent for Continual
    Learning*, AISTATS 2020 (arXiv:1910.07104), Alg. 1 and Eq. 4.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax.chain(cl_optax.ogd(max_directions=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> out = {"w": jnp.array([[2.0, 0.0, 0.0]])}  # one stored output gradient
    >>> state = cl_optax.consolidate(state, params, output_grads=out)
    >>> tx.update({"w": jnp.ones(3)}, state, params)[0]["w"]
    Array([-0., -1., -1.], dtype=float32)
  """
  dtype = jnp.float32 if basis_dtype is None else basis_dtype

  _checks.check_hyperparameter(
    max_directions, transform="ogd", name="max_directions", low=1.0, integer=True
  )
  _checks.check_hyperparameter(rtol, transform="ogd", name="rtol", low=0.0)
  block_size = 200 if block_size is None else block_size
  _checks.check_hyperparameter(
    block_size, transform="ogd", name="block_size", low=1.0, integer=True
  )
  sizes = _block_rows(max_directions, block_size)
  starts = np.cumsum((0, *sizes[:-1])).tolist()

  def init_fn(params: optax.Params) -> OGDState:
    def block(n):  # broadcast from zeros_like: the rows are sharded like the leaf
      return jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.zeros_like(p, dtype)[None], (n, *jnp.shape(p))), params
      )

    zero = jnp.zeros((), jnp.int32)
    return OGDState(
      tuple(block(n) for n in sizes), zero, jnp.zeros_like(zero), jnp.asarray(rtol, jnp.float32)
    )  # own buffers

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("ogd", extra_args)
    del params, extra_args
    state = cast(OGDState, state)
    if not isinstance(state.basis, (tuple, list)) or len(state.basis) != len(sizes):
      raise ValueError(
        f"ogd: `basis` must be a tuple of {len(sizes)} blocks (max_directions="
        f"{max_directions}, block_size={block_size}); got {type(state.basis).__name__}."
      )
    pairs = [
      _checks.matching_leaves(updates, blk, transform="ogd", name="basis", lead=(n,))
      for blk, n in zip(state.basis, sizes)
    ]
    state = state._replace(ogd_rtol=jnp.asarray(rtol, jnp.float32))
    if not pairs[0]:
      return updates, state
    leaves = [x for x, _ in pairs[0]]
    blocks = [[b for _, b in block] for block in pairs]
    out = _project(leaves, blocks, starts, state.basis_count)
    return _trees.replace_unmasked(updates, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
