r"""Experience replay (ER) as a gradient combination: :func:`experience_replay`.

ER trains on the current batch and a batch drawn from an episodic memory
(:mod:`cl_optax.replay`) together. The memory term is a loss on other data
(the stored examples and their labels), independent of the current batch, so
its gradient is a second gradient the user computes in the same jitted step,
exactly as A-GEM's reference gradient; ER *adds* it where A-GEM projects
against it. So the two replay methods share one memory and one extra argument
shape, and differ only in the transform.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees


class ExperienceReplayState(NamedTuple):
  """State of :func:`experience_replay`.

  Attributes:
    replay_steps: number of updates that added a (finite) replay gradient (a
      diagnostic; int32).
  """

  TRANSFORM = "experience_replay"
  SIGNALS = ()
  EXTRA_ARGS = ("replay_grads",)

  replay_steps: jax.Array  # shape=(), int32

  def consolidate(self, params: optax.Params, **signals: Any) -> ExperienceReplayState:
    """ER keeps no task state: its memory is the user's replay buffer."""
    del params, signals
    return self


def experience_replay(strength: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Experience replay: adds the memory batch's gradient to the current one.

  With :math:`g` the gradient of the loss on the current batch and
  :math:`g_{mem}` the gradient of the mean loss on a batch drawn from the
  episodic memory (the extra arg ``replay_grads=``),

  .. math::
    \tilde g = g + \lambda \, g_{mem},

  the gradient of :math:`\ell(B) + \lambda\,\ell(B_M)` (Chaudhry et al. 2019,
  Alg. 1, "ER-reservoir"; Riemer et al. 2019). Chaudhry et al. and the DER
  authors' code take one step on the *union* :math:`B \cup B_M`, whose mean
  loss is :math:`(|B|\,\ell(B) + |B_M|\,\ell(B_M)) / (|B| + |B_M|)`: that is
  this update with :math:`\lambda = |B_M| / |B|`, scaled by :math:`|B| / (|B| +
  |B_M|)` (half the learning rate for equal batch sizes). The sum form is kept
  so that an empty memory (a zero replay gradient, e.g. the weighted loss of
  a sample with no valid row) leaves :math:`g` unchanged.

  DER++'s second term, :math:`\beta\,\ell(x', y')` on a memory batch with its
  labels (Buzzega et al. 2020, Eq. 6), is this transform with
  :math:`\lambda = \beta`; the logit term goes in the loss
  (:func:`cl_optax.losses.der_logit_mse`).

  Without ``replay_grads``, or when it holds a non-finite value (or ``g``
  does), the update passes through unchanged. Put it *before* the base
  optimiser (``chain(experience_replay(), sgd(lr))``) so that the optimiser
  sees the combined gradient, as in the papers.

  Args:
    strength: :math:`\lambda`, the weight of the memory loss (1.0: equal
      weight per batch).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``replay_grads=`` (a pytree like the updates, any float dtype).

  References:
    Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr, Ranzato, *On Tiny
    Episodic Memories in Continual Learning*, 2019 (arXiv:1902.10486), Alg. 1;
    Riemer et al., *Learning to Learn without Forgetting by Maximizing Transfer
    and Minimizing Interference*, ICLR 2019 (ER baseline); Buzzega et al.,
    *Dark Experience for General Continual Learning*, NeurIPS 2020, Eq. 6 and
    code aimagelab/mammoth ``models/er.py``, ``models/derpp.py``.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = optax.chain(cl_optax.experience_replay(0.5), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g, g_mem = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}
    >>> updates, state = tx.update(g, state, params, replay_grads=g_mem)
    >>> updates["w"]  # -(g + 0.5 g_mem)
    Array([-1., -1.], dtype=float32)
  """

  _checks.check_hyperparameter(strength, transform="experience_replay", name="strength", low=0.0)

  def init_fn(params: optax.Params) -> ExperienceReplayState:
    del params
    return ExperienceReplayState(replay_steps=jnp.zeros((), jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    replay_grads: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("experience_replay", extra_args)
    del params, extra_args
    state = cast(ExperienceReplayState, state)
    if replay_grads is None:
      return updates, state
    pairs = _checks.matching_leaves(
      updates, replay_grads, transform="experience_replay", name="replay_grads"
    )
    if not pairs:
      return updates, state
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for pair in pairs for x in pair]))
    weight = jnp.asarray(strength, jnp.float32)

    def leaf(u, r):
      mixed = (u.astype(jnp.float32) + weight * r.astype(jnp.float32)).astype(u.dtype)
      return jnp.where(ok, mixed, u)

    new = _trees.map_unmasked(leaf, updates, _trees.restrict_to_updates(updates, replay_grads))
    return new, ExperienceReplayState(state.replay_steps + ok.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
