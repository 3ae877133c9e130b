"""A-GEM: averaged gradient episodic memory (Chaudhry et al., 2019)."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees


class AGEMState(NamedTuple):
  """State of :func:`agem`.

  Attributes:
    agem_projected: number of steps in which the constraint was violated and
      the gradient was projected (a diagnostic; int32).
  """

  TRANSFORM = "agem"
  SIGNALS = ()
  EXTRA_ARGS = ("ref_grads",)

  agem_projected: jax.Array  # shape=(), int32

  def consolidate(self, params: optax.Params, **signals: Any) -> AGEMState:
    """A-GEM keeps no task state: its memory is the user's replay buffer."""
    del params, signals
    return self


def agem() -> optax.GradientTransformationExtraArgs:
  r"""A-GEM: averaged gradient episodic memory (Chaudhry et al., 2019).

  With :math:`g_{ref}` the gradient of the loss on a batch drawn from the
  episodic memory of all past tasks (the extra arg ``ref_grads=``),

  .. math::
    \tilde g = g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}}\, g_{ref}
    \quad \text{if } g^\top g_{ref} < 0, \qquad \tilde g = g \text{ otherwise,}

  where the dot products run over the whole pytree (all leaves flattened into
  one vector, as in the official code). Without ``ref_grads`` (the first task),
  with a zero reference gradient or a non-finite gradient, the update passes
  through unchanged.

  Args: none (``ref_grads`` is a per-step extra arg).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``ref_grads=`` (a pytree like the updates, any float dtype).

  References:
    Chaudhry, Ranzato, Rohrbach, Elhoseiny, *Efficient Lifelong Learning with
    A-GEM*, ICLR 2019 (arXiv:1812.00420), Eq. 11; official code
    facebookresearch/agem (``model/model.py``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = optax.chain(cl_optax.agem(), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g, g_ref = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-1.0, 0.0])}
    >>> updates, state = tx.update(g, state, params, ref_grads=g_ref)
    >>> updates["w"]  # -(g - (g.r / r.r) r) = -(0, 1)
    Array([-0., -1.], dtype=float32)
  """

  def init_fn(params: optax.Params) -> AGEMState:
    del params
    return AGEMState(agem_projected=jnp.zeros((), jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    ref_grads: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("agem", extra_args)
    del params, extra_args
    state = cast(AGEMState, state)
    if ref_grads is None:
      return updates, state
    pairs = _checks.matching_leaves(updates, ref_grads, transform="agem", name="ref_grads")
    if not pairs:
      return updates, state
    # Sums of products (not vdot, which ravels): XLA reduces them across
    # devices without gathering a sharded leaf.
    dot = sum(jnp.sum(u.astype(jnp.float32) * r.astype(jnp.float32)) for u, r in pairs)
    rr = sum(jnp.sum(jnp.square(r.astype(jnp.float32))) for _, r in pairs)
    project = (dot < 0) & (rr > 0) & jnp.isfinite(dot) & jnp.isfinite(rr)
    coef = jnp.where(project, dot / jnp.where(rr > 0, rr, 1.0), 0.0)

    def leaf(u, r):
      return jnp.where(
        project, (u.astype(jnp.float32) - coef * r.astype(jnp.float32)).astype(u.dtype), u
      )

    new = _trees.map_unmasked(leaf, updates, _trees.restrict_to_updates(updates, ref_grads))
    return new, AGEMState(state.agem_projected + project.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
