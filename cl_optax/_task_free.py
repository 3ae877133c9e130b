r"""Penalties without task boundaries: :func:`task_free`, consolidate on a schedule or a trigger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _state, _trees


class TaskFreeState(NamedTuple):
  """State of :func:`task_free`.

  Attributes:
    task_free_inner: the wrapped transform's state (its continual states are
      consolidated inside ``update``; :func:`cl_optax.consolidate` still
      reaches them at a real boundary).
    task_free_sums: per signal name, the running sum (float32, like params)
      of the signal given to ``update`` since the last refresh.
    task_free_count: int32, updates since the last refresh.
    task_free_refreshes: int32, refreshes so far.
  """

  EXTRA_ARGS = ("refresh", "importance", "precision")

  task_free_inner: Any
  task_free_sums: Any
  task_free_count: jax.Array  # shape=(), int32
  task_free_refreshes: jax.Array  # shape=(), int32


def _add(total: Any, signal: Any, name: str) -> Any:
  """``total + signal`` where ``total`` has leaves (``signal`` cut to its structure)."""
  signal = _trees.restrict_like(total, signal, transform="task_free", name=name)
  return _trees.map_unmasked(lambda t, x: t + jnp.asarray(x, jnp.float32), total, signal)


def _refresh(state: TaskFreeState, params, names) -> TaskFreeState:
  """Consolidates the inner state with the mean signals, clears the sums."""
  n = jnp.maximum(state.task_free_count, 1).astype(jnp.float32)
  means = {k: jax.tree.map(lambda s: s / n, state.task_free_sums[k]) for k in names}
  inner = _state.consolidate(state.task_free_inner, params, **means)
  return TaskFreeState(
    task_free_inner=inner,
    task_free_sums=jax.tree.map(jnp.zeros_like, state.task_free_sums),
    task_free_count=jnp.zeros_like(state.task_free_count),
    task_free_refreshes=state.task_free_refreshes + 1,
  )


def task_free(
  inner: optax.GradientTransformation,
  *,
  every: int | None = None,
  signals: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  r"""Runs a penalty on a stream without task boundaries: consolidate inside ``update``.

  ``ewc``, ``online_ewc``, ``si``, ``mas``, ``rwalk`` (any transform whose
  state :func:`cl_optax.consolidate` reaches) need a ``consolidate`` call at a
  task boundary, which an online stream does not have. ``task_free(inner,
  every=k)`` makes that call itself, inside the jitted ``update`` (a
  ``lax.cond``, so no host call and no retrace): after every :math:`k`
  updates, and at any update whose extra argument ``refresh=`` (a traced
  bool scalar: the output of a loss-plateau detector, as task-free MAS uses,
  computed by the training step) is true. The importance and anchor are then
  refreshed by the inner transform's own merge rule, at the params given to
  that ``update`` (before its step).

  A signal the merge reads (``importance=`` for ``ewc``/``online_ewc``/
  ``mas``) is named in ``signals`` and passed to *every* ``update`` as an
  extra argument of the params' shape (e.g. the batch's squared gradient, an
  empirical Fisher, or the batch's MAS sensitivity): its mean over the updates
  since the last refresh is the consolidate signal. ``si`` and ``rwalk``
  collect their statistics inside ``update`` and need none. ``online_ewc``
  with ``decay < 1`` is the natural online choice (the summed ``ewc`` grows
  with every refresh).

  Args:
    inner: the transform to run (e.g. ``cl_optax.online_ewc(10., decay=0.9)``;
      a chain holding it works too). Place ``task_free(...)`` where the inner
      transform would go (first, before the optimiser).
    every: refresh after this many updates (``None``: only on ``refresh=``).
    signals: names of the consolidate signals given to ``update`` every step.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Aljundi, Kelchtermans, Tuytelaars, *Task-free continual learning*, CVPR
    2019 (importance refreshed at loss plateaus); Chaudhry et al., ECCV 2018
    (EWC++'s online Fisher).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = optax.chain(
    ...   cl_optax.task_free(cl_optax.online_ewc(1.0, decay=0.5), every=2,
    ...                      signals=["importance"]),
    ...   optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   g = {"w": jnp.array([1.0, 0.0])}
    ...   u, state = tx.update(g, state, params, importance={"w": g["w"] ** 2})
    ...   params = optax.apply_updates(params, u)
    >>> optax.tree.get(state, "online_ewc_importance")["w"]  # refreshed at the 2nd update
    Array([1., 0.], dtype=float32)
  """

  if every is not None:
    _checks.check_hyperparameter(every, transform="task_free", name="every", low=1, integer=True)
  names = tuple(signals)

  def init_fn(params: optax.Params) -> TaskFreeState:
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)  # noqa: E731
    return TaskFreeState(
      task_free_inner=inner.init(params),
      task_free_sums={k: zeros() for k in names},
      task_free_count=jnp.zeros((), jnp.int32),
      task_free_refreshes=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, refresh=None, **extra_args):
    state = cast(TaskFreeState, state)
    if params is None:
      raise ValueError("task_free: update needs `params` (the anchor of a refresh).")
    missing = [k for k in names if k not in extra_args]
    if missing:
      raise ValueError(f"task_free: update needs the signal(s) {missing} at every step.")
    out, inner_state = optax.with_extra_args_support(inner).update(
      updates, state.task_free_inner, params, **extra_args
    )
    sums = {k: _add(state.task_free_sums[k], extra_args[k], k) for k in names}
    state = state._replace(
      task_free_inner=inner_state, task_free_sums=sums, task_free_count=state.task_free_count + 1
    )
    fire = jnp.asarray(False) if refresh is None else jnp.asarray(refresh, bool)
    if every is not None:
      fire = fire | (state.task_free_count >= every)
    keep = lambda s: s  # noqa: E731
    state = jax.lax.cond(fire, lambda s: _refresh(s, params, names), keep, state)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
