r"""Boundary writes: a parameter change decided at ``consolidate``, emitted as the next update.

A task boundary sometimes has to *set* parameters: PackNet zeroes the weights
it prunes, shrink-and-perturb sets :math:`\theta \leftarrow \lambda\theta +
\sigma\theta_{\text{fresh}}`, O-LoRA writes an adapter into its slot, a head
is re-aligned. The optax way to change parameters is an update, so the write
is kept in the optimiser state (jittable, sharded like the parameters,
checkpointed with the rest) and emitted by the next ``update``:

.. math::
  u_i \leftarrow \begin{cases} t_i - \theta_i & \text{written entries} \\
  u_i & \text{otherwise} \end{cases}

then cleared. ``optax.apply_updates`` gives :math:`\theta_i + (t_i - \theta_i)`:
exactly :math:`t_i = 0` for a write of zero (:math:`\theta + (-\theta) = 0` in
floating point), :math:`t_i` up to one rounding of :math:`t_i - \theta_i`
otherwise.

This module and :mod:`cl_optax._write_pieces` are the one home of the mechanism:

- the pieces a method's own state embeds (:class:`PendingWrite`,
  :func:`init_pending`, :func:`schedule` at ``consolidate``, :func:`emit` in
  ``update``, :func:`write_leaf` for one leaf), defined in
  :mod:`cl_optax._write_pieces` and re-exported here;
- the standalone transform :func:`boundary_writes` and the chain check
  :func:`check_writes_last`;
- :func:`apply_pending_writes`, which applies and clears every pending write of
  an optimiser state at once (for a user who evaluates before the next step).

See ``docs/boundary_writes_and_resets.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _trees
from cl_optax._write_pieces import PendingWrite as PendingWrite
from cl_optax._write_pieces import apply_leaf as apply_leaf
from cl_optax._write_pieces import apply_now as apply_now
from cl_optax._write_pieces import broadcast_like as broadcast_like
from cl_optax._write_pieces import emit as emit
from cl_optax._write_pieces import init_pending as init_pending
from cl_optax._write_pieces import is_pending as is_pending
from cl_optax._write_pieces import replicated as replicated
from cl_optax._write_pieces import schedule as schedule
from cl_optax._write_pieces import validated_writes as validated_writes
from cl_optax._write_pieces import write_leaf as write_leaf

_TRANSFORM = "boundary_writes"


def apply_pending_writes(
  params: optax.Params, opt_state: optax.OptState
) -> tuple[optax.Params, optax.OptState]:
  """Applies every pending boundary write of ``opt_state`` to ``params`` now, and clears them.

  For a user who evaluates between ``consolidate`` and the next step: the
  returned parameters are those the next ``update`` + ``optax.apply_updates``
  would give on the written entries (bitwise: the same ``p + (t - p)``),
  unchanged elsewhere, and the returned state has nothing pending, so the
  next step is an ordinary one. Walks any optax state tree the way
  :func:`cl_optax.consolidate` does (chain, masked, partition, MultiSteps,
  inject_hyperparams, apply_if_finite, an ``nnx.Optimizer``, whose variables
  are set in place) and applies each :class:`PendingWrite` it finds, in tree
  order. Jittable.

  Args:
    params: the parameters the optimiser was initialised with (their current
      values); NNX ``Variable`` leaves are read.
    opt_state: an optax state, or an ``nnx.Optimizer`` / its ``opt_state``.

  Returns:
    ``(params, opt_state)``: plain-array parameters (for NNX, write them back
    with ``nnx.update(model, params)``) and the state with no pending write.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx = optax.chain(optax.adam(1e-3), cl_optax.boundary_writes())
    >>> state = cl_optax.consolidate(
    ...     tx.init(params), params, writes=0.0,
    ...     write_mask={"w": jnp.array([True, False, True])})
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> params["w"]
    Array([0., 2., 0.], dtype=float32)
  """
  opt_state = _trees.optimizer_state(opt_state)
  box = [_trees.unwrap_variables(params)]

  def apply(pending):
    box[0], cleared = apply_now(pending, box[0])
    return cleared

  new_state = _trees.map_nodes(opt_state, is_pending, apply)
  return box[0], new_state


class BoundaryWritesState(NamedTuple):
  """State of :func:`boundary_writes`.

  Attributes:
    pending: the scheduled write (:class:`PendingWrite`), emitted and cleared
      by the next ``update``.
  """

  pending: PendingWrite

  def consolidate(self, params, **signals) -> BoundaryWritesState:
    """Schedules ``writes=`` (targets) on the entries of ``write_mask=`` (default: all).

    ``writes=None`` schedules nothing; a missing ``writes=`` is an error (a
    misspelt signal would otherwise write nothing without a word).
    """
    del params
    got = validated_writes(signals, self.pending.write_target, transform=_TRANSFORM)
    if got is None:
      return self
    return self._replace(pending=schedule(self.pending, *got))


def boundary_writes() -> optax.GradientTransformationExtraArgs:
  r"""Parameter writes decided at a task boundary, landing exactly on the next step.

  At :func:`cl_optax.consolidate` with ``writes=`` (target values) and
  ``write_mask=`` (which entries), the write is stored; the next ``update``
  replaces the incoming update of every written entry by
  :math:`t - \theta` and passes the others through, then clears the write:

  .. math::
    u \leftarrow M \odot (t - \theta) + (1 - M) \odot u

  so ``optax.apply_updates`` lands written entries on :math:`t` — exactly for
  :math:`t = 0` (PackNet's pruned weights), up to one rounding of
  :math:`t - \theta` otherwise — and gives the others their ordinary step.

  **Put it last in the chain** (``optax.chain(optax.adam(lr),
  cl_optax.boundary_writes())``): any transform after it rescales
  :math:`t - \theta` (``sgd(lr)`` would move the entries only ``lr`` of the
  way, Adam would normalise the step away). The state cannot show it (a
  stateless ``optax.scale`` leaves no trace), so check a chain once with
  :func:`cl_optax.check_writes_last`, which runs one armed update.
  ``optax.MultiSteps``: the write lands at the next real step (mini-steps
  do not call the inner transform). ``optax.apply_if_finite``: a skipped
  step keeps the inner state, so the write stays pending until a finite step
  applies it; a non-finite update entry passes unchanged, also where written.
  To apply the write at once (evaluation right after the boundary), use
  :func:`cl_optax.apply_pending_writes`.

  Signals (``consolidate``):
    writes: target values: a pytree like params, leaves broadcastable to the
      parameters, or one number for every written entry; ``None`` writes
      nothing at this boundary. Required (the message names it if missing).
    write_mask: ``bool`` pytree like params (leaves broadcastable, e.g. one
      bool per leaf or a ``[1, n]`` column mask) or one bool; default
      ``True``. Two boundaries before a step merge: the later target wins on
      entries both write.

  Memory: a params-dtype target and a ``bool`` per parameter entry (see
  :class:`PendingWrite`); ``optax.masked(boundary_writes(), labels)`` keeps
  them only for the labelled leaves. A step with nothing pending costs one
  scalar test.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Mallya & Lazebnik, *PackNet*, CVPR 2018 (prune: pruned weights set to 0);
    Ash & Adams, *On warm-starting neural network training*, NeurIPS 2020
    (shrink and perturb, :math:`\theta \leftarrow 0.4\theta + 0.1\theta'`).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx = optax.chain(optax.sgd(0.1), cl_optax.boundary_writes())
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(
    ...     state, params, writes=0.0, write_mask={"w": jnp.array([False, True, False])})
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.9, 0. , 2.9], dtype=float32)
  """

  def init_fn(params):
    return BoundaryWritesState(pending=init_pending(params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    updates, pending = emit(updates, state.pending, params, transform=_TRANSFORM)
    return updates, BoundaryWritesState(pending=pending)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_writes_last(tx: optax.GradientTransformation, params: optax.Params, **extra_args) -> None:
  """Raises a ``ValueError`` when a transform after a boundary write rescales it.

  A debugging check for a chain (run it once, outside ``jit``): it arms every
  :class:`PendingWrite` of a fresh ``tx.init(params)`` with the write
  ``t = params + 1`` on every entry, runs one ``tx.update`` on zero gradients
  (``extra_args`` are passed on, e.g. ``ref_grads=`` for ``agem``) and checks
  that the updates are ``t - params`` (about 1). A transform after the write
  (``sgd``'s ``-lr``, Adam's normalisation, a clip) changes them; the message
  names the leaves and the factor seen. Under ``optax.MultiSteps`` check the
  inner transform (the first call is a mini-step).

  Raises:
    ValueError: if ``tx`` holds no pending-write state, or its update does not
      deliver the writes unchanged.
  """
  plain = _trees.unwrap_variables(params)
  state = tx.init(params)
  armed = []

  def arm(pending):
    full = _trees.restrict_like(
      pending.write_target, plain, transform="check_writes_last", name="params"
    )
    target = _trees.map_unmasked(lambda t, p: (p + 1).astype(t.dtype), pending.write_target, full)
    armed.append(target)
    mask = _trees.map_unmasked(lambda m: jnp.ones_like(m), pending.write_mask)
    return PendingWrite(target, mask, jnp.ones((), jnp.bool_))

  state = _trees.map_nodes(state, is_pending, arm)
  if not armed:
    raise ValueError("check_writes_last: `tx` holds no boundary-write state (boundary_writes()).")
  zeros = jax.tree.map(jnp.zeros_like, plain)
  updates, _ = tx.update(zeros, state, params, **extra_args)
  bad = []
  paths = _trees.key_strings(armed[-1])
  for path, t, p, u in zip(
    paths,
    jax.tree.leaves(armed[-1], is_leaf=_trees.is_masked),
    jax.tree.leaves(plain, is_leaf=_trees.is_masked),
    jax.tree.leaves(updates, is_leaf=_trees.is_masked),
    strict=True,
  ):
    if _trees.is_masked(t) or _trees.is_masked(u) or np.size(u) == 0:
      continue
    want = np.asarray(jnp.asarray(t, jnp.float32) - jnp.asarray(p, jnp.float32))
    got = np.asarray(jnp.asarray(u, jnp.float32))
    if not np.allclose(got, want, rtol=1e-2, atol=1e-6):
      ratio = float(np.median(got / np.where(want == 0, 1, want)))
      bad.append(f"{path} (updates = {ratio:.3g} x the write)")
  if bad:
    raise ValueError(
      "check_writes_last: a transform after the boundary write changes it, so written entries "
      f"would miss their targets: {bad}. Put boundary_writes() (or the method that embeds a "
      "write) last in the chain, after the learning rate and any adaptive optimiser."
    )
