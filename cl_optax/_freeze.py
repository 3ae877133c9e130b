"""Hard 0/1 masking (PackNet / HAT style): :func:`freeze`."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees


class FreezeState(NamedTuple):
  """State of :func:`freeze`.

  Attributes:
    frozen: boolean pytree like params; ``True`` entries get a zero update.
    freeze_threshold: importance at or above which an entry freezes; refreshed
      from the factory argument at every update.
  """

  TRANSFORM = "freeze"
  SIGNALS = ("importance",)
  EXTRA_ARGS = ()

  frozen: Any
  freeze_threshold: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> FreezeState:
    """Freezes every entry whose task ``importance`` reaches the threshold."""
    del params
    new = _checks.validated_signal(
      signals, "importance", self.frozen, transform="freeze", values="unit"
    )
    frozen = jax.tree.map(
      lambda f, i: f | _trees.placed_like(f, jnp.asarray(i) >= self.freeze_threshold),
      self.frozen,
      new,
    )
    return self._replace(frozen=frozen)


def freeze(*, threshold: float = 0.5) -> optax.GradientTransformationExtraArgs:
  r"""Hard 0/1 masking: entries important to an earlier task never move again.

  .. math::
    u \leftarrow (1 - M) \odot u, \qquad M^{t} = M^{t-1} \lor (\gamma^{t-1} \ge \tau)

  The limit of :func:`soft_mask` with binary importance, as in PackNet
  (Mallya & Lazebnik, CVPR 2018; parameters pruned and kept per task) and HAT
  (Serra et al., ICML 2018; hard attention masks with ``s_max`` large).
  :func:`cl_optax.consolidate` with ``importance=`` (a 0/1 mask or a soft
  importance in [0, 1]) adds the entries at or above ``threshold``.

  Args:
    threshold: importance level from which an entry is frozen (kept in the
      state, refreshed at every update, used at ``consolidate``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = optax.chain(optax.sgd(1.0), cl_optax.freeze())
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(
    ...     state, params, importance={"w": jnp.array([0.0, 0.4, 1.0])})
    >>> tx.update({"w": jnp.ones(3)}, state, params)[0]["w"]
    Array([-1., -1., -0.], dtype=float32)
  """

  _checks.check_hyperparameter(threshold, transform="freeze", name="threshold", low=0.0, high=1.0)

  def init_fn(params: optax.Params) -> FreezeState:
    frozen = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.bool_), params)
    return FreezeState(frozen=frozen, freeze_threshold=jnp.asarray(threshold, jnp.float32))

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("freeze", extra_args)
    del params, extra_args
    state = cast(FreezeState, state)
    _checks.check_updates(updates, state.frozen, transform="freeze")
    updates = jax.tree.map(lambda f, u: _trees.mask_leaf(u, ~f), state.frozen, updates)
    return updates, state._replace(freeze_threshold=jnp.asarray(threshold, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
