r"""Riemannian walk: :func:`rwalk`, EWC++'s online Fisher plus a KL-normalised path score."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._penalty import add_penalty, copy_f32, f32_like, zeros

_EPS = 1e-32  # the official code's EPSILON in the min-max normalisation


class RWalkState(NamedTuple):
  """State of :func:`rwalk`.

  Attributes:
    rwalk_anchor: :math:`\\theta^*`, the params at the end of the last task.
    rwalk_importance: :math:`\\tilde F + \\tilde S`, the normalised Fisher and
      score of the last consolidate (the penalty's weights; 0 before it).
    rwalk_fisher: :math:`F`, the running (EMA) Fisher, never reset.
    rwalk_grad_sq: :math:`T`, the summed squared gradients of the window (of
      the task with ``official=True``).
    rwalk_path: :math:`s + g_{k}\\odot(\\theta_k - \\theta_K)`: the window's
      path integral plus the last gradient times its displacement from the
      window start (so no copy of the previous params is kept, as in :func:`cl_optax.si`).
    rwalk_prev_grad: :math:`g_k`, the gradient recorded at the previous update.
    rwalk_window: :math:`\\theta_K`, the params at the start of the window.
    rwalk_score: :math:`S_t`, this task's summed window scores.
    rwalk_score_acc: :math:`\\hat S`, the scores merged over the finished tasks.
    rwalk_count: int32, the updates of this task so far.
    rwalk_tasks: int32, the consolidated tasks.
    rwalk_official: bool, the official code's accumulation (see :func:`rwalk`).
  """

  TRANSFORM = "rwalk"
  SIGNALS = ()
  EXTRA_ARGS = ()

  rwalk_anchor: Any
  rwalk_importance: Any
  rwalk_fisher: Any
  rwalk_grad_sq: Any
  rwalk_path: Any
  rwalk_prev_grad: Any
  rwalk_window: Any
  rwalk_score: Any
  rwalk_score_acc: Any
  rwalk_count: jax.Array  # shape=(), int32
  rwalk_tasks: jax.Array  # shape=(), int32
  rwalk_official: jax.Array  # shape=(), bool

  def consolidate(self, params: optax.Params, **signals: Any) -> RWalkState:
    """Merges the task's score, normalises score and Fisher network-wide, sets the anchor."""
    del signals  # RWalk needs none: its statistics are collected inside update
    params = _trees.restrict_like(self.rwalk_anchor, params, transform="rwalk", name="params")
    params = f32_like(self.rwalk_anchor, params)
    keep = jnp.where(self.rwalk_official, 1.5, 0.5)
    first = self.rwalk_tasks == 0
    acc = _trees.map_unmasked(
      lambda a, s: jnp.where(first, s, keep * a + 0.5 * s), self.rwalk_score_acc, self.rwalk_score
    )
    importance = _trees.map_unmasked(
      lambda i, f, s: (f + s).astype(i.dtype),
      self.rwalk_importance,
      min_max(self.rwalk_fisher),
      min_max(acc),
    )
    cleared = _trees.map_unmasked(lambda p: jnp.zeros_like(p), params)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  every state leaf owns its buffer
    return self._replace(
      rwalk_anchor=params,
      rwalk_importance=importance,
      rwalk_grad_sq=cleared,
      rwalk_path=copy(cleared),
      rwalk_prev_grad=copy(cleared),
      rwalk_window=copy(params),
      rwalk_score=copy(cleared),
      rwalk_score_acc=acc,
      rwalk_count=jnp.zeros_like(self.rwalk_count),
      rwalk_tasks=self.rwalk_tasks + 1,
    )


def min_max(tree: Any) -> Any:
  """``(x - min) / (max - min + 1e-32)`` with min and max over all unmasked leaves."""
  leaves = [x for x in _trees.unmasked_leaves(tree) if x.size]
  if not leaves:
    return tree
  lo = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  hi = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
  return _trees.map_unmasked(lambda x: (x - lo) / (hi - lo + _EPS), tree)


def _close_window(state: RWalkState, path, params, *, alpha, xi, every):
  """The every-K-steps rule: score the window, update F, restart the window."""

  def score(s, p, f, w, sc):
    return sc + jax.nn.relu(p / (xi + f * jnp.square(s - w)))

  new_score = _trees.map_unmasked(
    score, params, path, state.rwalk_fisher, state.rwalk_window, state.rwalk_score
  )
  fisher = _trees.map_unmasked(
    lambda f, t: (1.0 - alpha) * f + alpha * t / every, state.rwalk_fisher, state.rwalk_grad_sq
  )
  grad_sq = _trees.map_unmasked(
    lambda t: jnp.where(state.rwalk_official, t, 0.0), state.rwalk_grad_sq
  )
  zero = _trees.map_unmasked(jnp.zeros_like, path)
  window = _trees.map_unmasked(lambda s: s, params)
  return new_score, fisher, grad_sq, window, zero


def _walk(state: RWalkState, grads, params, *, alpha, xi, every) -> RWalkState:
  """One update's bookkeeping: path, window rule (``lax.cond``), squared gradients."""
  params = f32_like(state.rwalk_anchor, params)
  grads = f32_like(state.rwalk_anchor, grads)
  # s = the path integral including the previous step's -g (theta_now - theta_prev).
  path = _trees.map_unmasked(
    lambda h, g, p, w: h - g * (p - w),
    state.rwalk_path,
    state.rwalk_prev_grad,
    params,
    state.rwalk_window,
  )
  carry = (state.rwalk_score, state.rwalk_fisher, state.rwalk_grad_sq, state.rwalk_window, path)
  close = lambda _: _close_window(state, path, params, alpha=alpha, xi=xi, every=every)  # noqa: E731
  score, fisher, grad_sq, window, path = jax.lax.cond(
    (state.rwalk_count + 1) % every == 0, close, lambda c: c, carry
  )
  grad_sq = _trees.map_unmasked(lambda t, g: t + jnp.square(g), grad_sq, grads)
  path = _trees.map_unmasked(lambda s, g, p, w: s + g * (p - w), path, grads, params, window)
  return state._replace(
    rwalk_fisher=fisher,
    rwalk_grad_sq=grad_sq,
    rwalk_path=path,
    rwalk_prev_grad=grads,
    rwalk_window=window,
    rwalk_score=score,
    rwalk_count=state.rwalk_count + 1,
  )


def rwalk(
  strength: float = 2.0,
  *,
  alpha: float = 0.9,
  every: int = 10,
  xi: float = 1e-3,
  official: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Riemannian walk (Chaudhry, Dokania, Ajanthan, Torr, ECCV 2018).

  .. math::
    g \leftarrow g + \lambda\,(\tilde F + \tilde S)\odot(\theta - \theta^*)

  with two statistics collected inside ``update`` from the incoming gradient
  :math:`g_k` (place ``rwalk`` *first* in the chain, where that is the loss
  gradient without the penalty, as the official code's
  ``vanilla_gradients_vars``) and the parameter change
  :math:`\Delta\theta_k` (read from consecutive ``params``, as
  :func:`cl_optax.si` does):

  - the path score :math:`s \mathrel{-}= g_k\odot\Delta\theta_k` and the
    squared gradients :math:`T \mathrel{+}= g_k^2`;
  - every :math:`K` updates (``every``; a ``lax.cond`` on a counter, at the
    update whose task-step index :math:`k` has :math:`(k+1) \bmod K = 0`, as
    the official loop): :math:`S_t \mathrel{+}= \mathrm{relu}\big(s /
    (\xi + F\odot(\theta-\theta_K)^2)\big)` with the Fisher *before* its
    update (the KL distance of the window's move), then the EWC++ Fisher
    :math:`F \leftarrow (1-\alpha)F + \alpha\,T/K`, :math:`\theta_K
    \leftarrow \theta`, :math:`s \leftarrow 0`, :math:`T \leftarrow 0`.

  ``cl_optax.consolidate(state, params)`` (no signal) ends a task: the
  score is averaged over tasks, :math:`\hat S \leftarrow S_0` after the first
  task and :math:`\hat S \leftarrow \tfrac12(\hat S + S_t)` later; :math:`\tilde
  F` and :math:`\tilde S` are :math:`F` and :math:`\hat S` min-max normalised
  over the *whole network* (all leaves together, as the code);
  :math:`\theta^* \leftarrow \theta`; :math:`S_t, s, T` and the step counter
  are reset, :math:`F` is kept.

  ``official=True`` keeps the two quirks of the official code (facebookresearch/agem
  ``model/model.py``): :math:`T` is not reset at each window, only at the task end
  (only the EWC branch calls ``reset_tmp_fisher``), so :math:`T/K` grows
  through the task; and the merge is ``assign_add`` of the average,
  :math:`\hat S \leftarrow \tfrac32\hat S + \tfrac12 S_t`. The default is the
  paper's form. Both keep the code's KL denominator :math:`F\Delta\theta^2`
  (no 1/2) and its :math:`\epsilon = 10^{-32}` in the normalisation. The code's
  loss :math:`\lambda_{\rm paper}\sum(\tilde F+\tilde S)(\theta-\theta^*)^2`
  has no 1/2: ``strength = 2 * lambda_paper`` (permuted MNIST: 1, so 2).

  Args:
    strength: :math:`\lambda` (= 2 :math:`\lambda_{\rm paper}`).
    alpha: :math:`\alpha \in [0, 1]`, the weight of the new window's Fisher
      (the code's ``fisher_ema_decay`` 0.9).
    every: :math:`K \ge 1`, updates per window (``fisher_update_after`` 10
      on permuted MNIST). Static under ``optax.inject_hyperparams``.
    xi: :math:`\xi > 0` of the score's denominator (``PARAM_XI_STEP`` 1e-3).
    official: the official code's accumulation (above). Static.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Chaudhry, Dokania, Ajanthan, Torr, *Riemannian Walk for incremental
    learning: understanding forgetting and intransigence*, ECCV 2018, Sec. 4;
    code facebookresearch/agem (``model/model.py`` ``create_pathint_ops``,
    ``create_fisher_ops``, ``task_updates``; ``fc_permute_mnist.py``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = optax.chain(cl_optax.rwalk(2.0, every=1), optax.sgd(0.5))
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   u, state = tx.update({"w": jnp.array([1.0, 0.0])}, state, params)
    ...   params = optax.apply_updates(params, u)
    >>> state = cl_optax.consolidate(state, params)
    >>> state[0].rwalk_importance["w"]  # the moved weight is the important one
    Array([2., 0.], dtype=float32)
  """

  _checks.check_hyperparameter(strength, transform="rwalk", name="strength", low=0.0)
  _checks.check_hyperparameter(alpha, transform="rwalk", name="alpha", low=0.0, high=1.0)
  _checks.check_hyperparameter(xi, transform="rwalk", name="xi", low=0.0, open_low=True)
  _checks.check_hyperparameter(every, transform="rwalk", name="every", low=1.0, integer=True)

  def init_fn(params: optax.Params) -> RWalkState:
    return RWalkState(
      rwalk_anchor=copy_f32(params),
      rwalk_importance=zeros(params),
      rwalk_fisher=zeros(params),
      rwalk_grad_sq=zeros(params),
      rwalk_path=zeros(params),
      rwalk_prev_grad=zeros(params),
      rwalk_window=copy_f32(params),
      rwalk_score=zeros(params),
      rwalk_score_acc=zeros(params),
      rwalk_count=jnp.zeros((), jnp.int32),
      rwalk_tasks=jnp.zeros((), jnp.int32),
      rwalk_official=jnp.asarray(official),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("rwalk", extra_args)
    del extra_args
    state = cast(RWalkState, state)
    out = add_penalty(
      updates, params, state.rwalk_anchor, state.rwalk_importance, strength, "rwalk"
    )
    return out, _walk(state, updates, params, alpha=alpha, xi=xi, every=every)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
