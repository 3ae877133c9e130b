"""GEM: gradient episodic memory (Lopez-Paz & Ranzato, 2017)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._linalg import contract
from cl_optax._qp import solve_box_qp


@functools.partial(jax.jit, static_argnames=("iterations",))
def _gem_dual(gram, dots, mask, strength, eps, active, *, iterations):
  """Whether to project, the dual solution ``v`` (0 on masked rows) and its active set.

  ``active``: the bounds the solver starts from (the previous solution's; all
  when it has no entries).
  """
  k = dots.shape[0]
  both = mask[:, None] & mask[None, :]
  gram = jnp.where(both, 0.5 * (gram + gram.T), 0.0)
  dots = jnp.where(mask, dots, 0.0)
  finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(dots))
  project = jnp.any(mask & (dots < 0)) & finite

  warm = active.shape == (k,)
  start = active | ~mask if warm else None  # masked rows sit on their bound (0)

  def solve(_):
    # Masked rows: a decoupled unit diagonal, so their v is 0 at the optimum.
    P = gram + jnp.diag(jnp.where(mask, jnp.asarray(eps, jnp.float32), 1.0))
    lower = jnp.where(mask, jnp.asarray(strength, jnp.float32), 0.0)
    v, act = solve_box_qp(P, dots, lower, iterations=iterations, active=start, return_active=True)
    return jnp.where(mask, v, 0.0), act if warm else active

  def keep(_):
    return jnp.zeros((k,), jnp.float32), active

  v, active = jax.lax.cond(project, solve, keep, None)
  return project, v, active


def _task_mask(task_mask: jax.Array | None, k: int) -> jax.Array:
  """``task_mask`` as a bool ``[k]`` array (all rows when ``None``), its shape checked."""
  if task_mask is None:
    return jnp.ones((k,), jnp.bool_)
  if tuple(np.shape(task_mask)) != (k,):
    raise ValueError(
      f"gem: `task_mask` has shape {tuple(np.shape(task_mask))}; expected ({k},) "
      "(one entry per row of task_grads)."
    )
  return jnp.asarray(task_mask).astype(jnp.bool_)


def _gram_and_dots(pairs: list, k: int) -> tuple[jax.Array, jax.Array]:
  r""":math:`G G^\top` (``[k, k]``) and :math:`G g` (``[k]``) in float32, summed over leaf pairs.

  ``pairs``: ``(update leaf, task_grads leaf)``, the latter with a leading
  axis of size ``k``.
  """
  gram = jnp.zeros((k, k), jnp.float32)
  dots = jnp.zeros((k,), jnp.float32)
  for u, t in pairs:  # contractions over the leaf's axes: no reshape of sharded leaves
    t32, rest = t.astype(jnp.float32), list(range(1, t.ndim))
    gram = gram + contract(t32, t32, (rest, rest))
    dots = dots + contract(t32, u.astype(jnp.float32), (rest, list(range(u.ndim))))
  return gram, dots


class GEMState(NamedTuple):
  """State of :func:`gem`.

  Attributes:
    gem_projected: number of steps in which some constraint was violated and
      the QP projection ran (a diagnostic; int32).
    gem_active: ``[max_tasks]`` bool, the bounds active at the last QP
      solution, where the next solve starts (shape ``(0,)`` without
      ``max_tasks``: then every solve starts with all bounds active).
  """

  TRANSFORM = "gem"
  SIGNALS = ()
  EXTRA_ARGS = ("task_grads", "task_mask")

  gem_projected: jax.Array  # shape=(), int32
  gem_active: jax.Array  # shape=(max_tasks,) or (0,), bool

  def consolidate(self, params: optax.Params, **signals: Any) -> GEMState:
    """GEM keeps no task state: its memory is the user's replay buffer."""
    del params, signals
    return self


def gem(
  strength: float = 0.5,
  *,
  max_tasks: int | None = None,
  eps: float = 1e-3,
  solver_iterations: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GEM: gradient episodic memory (Lopez-Paz & Ranzato, 2017).

  With :math:`G = [g_1, \dots, g_K]^\top` the gradients of the losses on the
  episodic memories of past tasks (extra arg ``task_grads=``, every leaf with
  a leading axis of size ``max_tasks``; rows where ``task_mask`` is ``False``
  are ignored), GEM projects :math:`g` onto the cone
  :math:`\{\tilde g : G \tilde g \ge 0\}` through the dual QP (paper Eq. 13)

  .. math::
    \min_{v \ge \gamma}\; \tfrac12 v^\top (G G^\top + \epsilon I) v + g^\top G^\top v,
    \qquad \tilde g = G^\top v^\star + g,

  set up as in the official code: :math:`P = G G^\top` symmetrised plus
  ``eps * I``, the lower bound :math:`\gamma` = ``strength`` (0.5 in the
  paper's runs) in place of the paper's "add a small constant to :math:`v^\star`",
  and the projection only when some :math:`\langle g, g_k \rangle < 0`.
  The official code ships the gradients to the host and calls ``quadprog`` in
  float64; here the QP is solved inside ``jit`` in float32 by
  :func:`cl_optax.projection.solve_box_qp` (an active-set method that stops once converged, at
  most ``solver_iterations`` steps, starting from the previous step's active
  set when ``max_tasks`` is given; tested against ``quadprog``). With
  ``eps > 0`` the exact solution has :math:`\langle \tilde g, g_k \rangle
  = \lambda_k - \epsilon v_k \ge -\epsilon v_k`.

  Args:
    strength: the lower bound :math:`\gamma \ge 0` on the dual variables.
    max_tasks: the expected leading axis of ``task_grads`` (checked when given;
      inferred otherwise). Given, the state keeps the QP's active set and the
      next step's solve starts from it.
    eps: ridge added to :math:`G G^\top` (official code: 1e-3).
    solver_iterations: the most iterations of the in-jit active-set QP solver
      (``3 * max_tasks + 5`` when ``None``); it stops earlier once converged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``task_grads=`` (leaves ``[max_tasks, *leaf.shape]``) and ``task_mask=``
    (bool ``[max_tasks]``, all rows valid when omitted; masked rows take no
    part in the QP but must hold finite numbers, e.g. zeros, as they are
    multiplied by 0). Without ``task_grads`` the update passes through
    unchanged.

  References:
    Lopez-Paz, Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017 (arXiv:1706.08840), Eq. 10-13; official code
    facebookresearch/GradientEpisodicMemory (``model/gem.py``, ``project2cone2``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> gem = cl_optax.gem(strength=0.0, max_tasks=2, eps=0.0)
    >>> tx = optax.chain(gem, optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([1.0, 1.0])}
    >>> task_grads = {"w": jnp.array([[-1.0, 0.0], [0.0, 0.0]])}
    >>> mask = jnp.array([True, False])
    >>> updates, _ = tx.update(g, state, params, task_grads=task_grads, task_mask=mask)
    >>> updates["w"]  # the projection of g onto {<g~, (-1, 0)> >= 0}, negated
    Array([-0., -1.], dtype=float32)
  """

  _checks.check_hyperparameter(strength, transform="gem", name="strength", low=0.0)
  _checks.check_hyperparameter(max_tasks, transform="gem", name="max_tasks", low=1.0, integer=True)

  def init_fn(params: optax.Params) -> GEMState:
    del params
    return GEMState(
      gem_projected=jnp.zeros((), jnp.int32),
      gem_active=jnp.ones((max_tasks or 0,), jnp.bool_),
    )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    task_grads: optax.Updates | None = None,
    task_mask: jax.Array | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    _debug.check_extra_args("gem", extra_args)
    del params, extra_args
    state = cast(GEMState, state)
    if task_grads is None:
      return updates, state
    t_leaves = _trees.unmasked_leaves(task_grads)
    if not t_leaves:
      return updates, state
    k = max_tasks if max_tasks is not None else int(np.shape(t_leaves[0])[0])
    pairs = _checks.matching_leaves(
      updates, task_grads, transform="gem", name="task_grads", lead=(k,)
    )
    if not pairs:
      return updates, state
    mask = _task_mask(task_mask, k)
    gram, dots = _gram_and_dots(pairs, k)
    project, v, active = _gem_dual(
      gram, dots, mask, strength, eps, state.gem_active, iterations=solver_iterations
    )

    def leaf(u, t):
      new = u.astype(jnp.float32) + jnp.tensordot(v, t.astype(jnp.float32), axes=1)
      return jnp.where(project, new.astype(u.dtype), u)

    new = _trees.map_unmasked(leaf, updates, _trees.restrict_to_updates(updates, task_grads))
    return new, GEMState(state.gem_projected + project.astype(jnp.int32), active)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
