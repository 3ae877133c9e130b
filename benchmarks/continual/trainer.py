"""A task's training: its batches, the loss over each example's active columns, one scan.

Each task trains in ONE jitted `lax.scan` over its batches (the optimiser, the
method's per-step side inputs and the progress ticks all run inside it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.continual.model import mlp_apply, xent
from benchmarks.continual.registry import Method, Step


def batch_indices(rng, n: int, batch: int, epochs: int | None, iters: int | None):
  """Shuffled example indices ``[steps, batch]`` (each epoch drops its last partial batch)."""
  if n < batch:
    raise ValueError(f"continual: a task has {n} training examples, fewer than a batch ({batch}).")
  per = n // batch  # fixed shapes inside the scan
  reps = epochs if iters is None else -(-iters // per)
  idx = np.concatenate([rng.permutation(n)[: per * batch] for _ in range(reps)]).reshape(-1, batch)
  return idx if iters is None else idx[:iters]


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def active_columns(columns, valid, task_ids, task):
  """Which of each example's head columns are active while training ``task``.

  An example of task ``j`` reads its own head, ``columns[j]``; a column is active if
  it was while training task ``j`` or is one of the current task's active output
  units. Task-IL: task ``j``'s own columns. Class-IL (one shared head): every class
  seen so far, so a replayed example competes with the new classes (over
  ``valid[j]`` alone it would only keep its old decisions and let every new class
  take it).
  """
  now = valid[task][None, :] & (columns[task_ids] == columns[task][None, :])
  return valid[task_ids] | now


def task_loss(apply: Callable, columns, valid, task) -> Callable:
  """``loss_fn(params, x, y, task_ids, weights=None)``: the mean cross-entropy where each
  example reads its own task's columns active now (:func:`active_columns`) while
  training ``task``; with ``weights`` the weighted mean."""

  def loss_fn(params, x, y, task_ids, weights=None):
    ok = active_columns(columns, valid, task_ids, task)
    losses = xent(apply(params, x), columns[task_ids], ok, y)
    if weights is None:
      return losses.mean()
    w = weights.astype(losses.dtype)  # e.g. the `valid` rows of a replay sample
    return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

  return loss_fn


def make_train(
  method: Method,
  tx: optax.GradientTransformation,
  *,
  hp: dict | None = None,
  apply: Callable = mlp_apply,
  ticks_every: int = 0,
  on_tick: Callable[[int], None] | None = None,
  padded: bool = False,
  model=None,
) -> Callable:
  """The jitted per-task trainer: one ``lax.scan`` over the task's batches.

  ``train(params, opt_state, aux, key, X, Y, idx, active, task, columns, valid,
  epoch_steps=None) -> (params, opt_state, aux, losses)``: step ``i`` trains on
  ``X[idx[i]], Y[idx[i]]``; with ``padded`` the steps where ``active`` is False are
  skipped (a ``lax.cond``). ``epoch_steps`` (the steps of one epoch; default the
  plan's length) and ``model`` reach the method's hooks as ``Step.epoch_steps``,
  ``Step.index`` (the step in the plan) and ``Step.model``.
  ``on_tick(ticks_every)`` is called from inside the scan every ``ticks_every`` steps.
  """
  hp = {} if hp is None else hp
  tick = on_tick if ticks_every and on_tick is not None else None

  @jax.jit
  def train(params, opt_state, aux, key, X, Y, idx, active, task, columns, valid,
            epoch_steps=None):  # fmt: skip
    per_epoch = idx.shape[0] if epoch_steps is None else epoch_steps
    loss_fn = task_loss(apply, columns, valid, task)

    def body(carry, inp):
      params, opt_state, aux, key = carry
      b, act, i = inp
      x, y = X[b], Y[b]
      key, sub = jax.random.split(key)
      tids = jnp.full(y.shape, task)

      def do(c):
        params, opt_state, aux = c
        s = Step(params, x, y, task, columns.shape[0], aux, sub, loss_fn, hp, apply, columns,
                 valid, i, per_epoch, model)  # fmt: skip
        extra = {}
        if method.step is not None:
          extra, aux = method.step(s)

        def total(p):
          loss = 0.0 if method.own_loss else loss_fn(p, x, y, tids)
          return loss if method.loss is None else loss + method.loss(s, p)

        loss, grads = jax.value_and_grad(total)(params)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, aux, loss

      def skip(c):
        return (*c, jnp.zeros((), jnp.float32))

      if padded:
        params, opt_state, aux, loss = jax.lax.cond(act, do, skip, (params, opt_state, aux))
      else:
        params, opt_state, aux, loss = do((params, opt_state, aux))
      if tick is not None:
        jax.lax.cond(
          (i + 1) % ticks_every == 0,
          lambda: jax.debug.callback(tick, ticks_every),
          lambda: None,
        )
      return (params, opt_state, aux, key), loss

    steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
    (params, opt_state, aux, key), losses = jax.lax.scan(
      body, (params, opt_state, aux, key), (idx, active, steps)
    )
    return params, opt_state, aux, losses

  return train
