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
    basis: orthonormal directions, a pytree like params whose leaves have a
      leading axis of size ``max_directions`` (rows past ``basis_count`` are 0).
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

  def consolidate(self, params: optax.Params, **signals: Any) -> OGDState:
    """Adds the task's ``output_grads`` to the basis (Gram-Schmidt, twice)."""
    del params
    grads = _checks.validated_signal(
      signals,
      "output_grads",
      self.basis,
      transform="ogd",
      rows=True,
      what="a pytree like params whose leaves have a leading axis of size n: the gradients "
      "of the model outputs at n stored samples, e.g. from cl_optax.importance.output_gradients",
    )
    b_leaves = _trees.unmasked_leaves(self.basis)
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
    basis = _trees.replace_unmasked(self.basis, basis)
    return self._replace(basis=basis, basis_count=count, basis_dropped=dropped)


def ogd(
  max_directions: int, *, rtol: float = 1e-4, basis_dtype: Any = None
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

  The buffer has a fixed capacity ``max_directions`` (state leaves
  ``[max_directions, *leaf.shape]``, so memory is ``max_directions`` times the
  model). A consolidate whose new independent directions do not fit raises a
  ``ValueError`` (nothing is truncated silently); traced under ``jit`` it cannot
  raise, and it counts the directions left out in ``basis_dropped`` instead.

  Args:
    max_directions: capacity of the basis (static; under
      ``optax.inject_hyperparams`` list it in ``static_args``).
    rtol: relative residual norm under which a candidate counts as dependent.
    basis_dtype: storage dtype of the basis (float32 when ``None``).

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

  def init_fn(params: optax.Params) -> OGDState:
    def rows(p):  # broadcast from zeros_like: the rows are sharded like the leaf
      return jnp.broadcast_to(jnp.zeros_like(p, dtype)[None], (int(max_directions), *jnp.shape(p)))

    basis = jax.tree.map(rows, params)
    zero = jnp.zeros((), jnp.int32)
    return OGDState(
      basis, zero, jnp.zeros_like(zero), jnp.asarray(rtol, jnp.float32)
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
    pairs = _checks.matching_leaves(
      updates, state.basis, transform="ogd", name="basis", lead=(int(max_directions),)
    )
    state = state._replace(ogd_rtol=jnp.asarray(rtol, jnp.float32))
    if not pairs:
      return updates, state
    coef = sum(
      contract(b.astype(jnp.float32), u.astype(jnp.float32), u.ndim) for u, b in pairs
    )  # [K]
    ok = jnp.all(jnp.isfinite(coef))

    # Every row, filled or not: on CPU a matvec over the whole buffer is as fast as
    # reading a sliced prefix (XLA copies the slice before the dot).
    def leaf(u, b):
      new = u.astype(jnp.float32) - jnp.tensordot(coef, b.astype(jnp.float32), axes=1)
      return jnp.where(ok, new.astype(u.dtype), u)

    return _trees.map_unmasked(
      leaf, updates, _trees.restrict_to_updates(updates, state.basis)
    ), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
