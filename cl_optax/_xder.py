r"""X-DER's logit rewrite (1/u rule), future-head constraint, consistency (Boschini et al. 2022).

X-DER is DER++ for class-incremental learning with a class-balanced memory
rebuilt at each boundary (:func:`cl_optax.replay.shrink` /
:func:`cl_optax.replay.fill`) whose stored logits are *rewritten* once later
heads have learned something about old examples (:func:`xder_logit_update`,
written back with :func:`cl_optax.replay.write`), plus a margin keeping the
future heads below the right one (:func:`xder_future_constraint`), the
current head's top probability above the past heads'
(:func:`xder_past_constraint`) and a
supervised-contrastive consistency on the future heads
(:func:`xder_consistency`); which sampled slots are rewritten in a step is
:func:`xder_rewrite_select` (the ``1/u`` rule). The
stream CE on the current head is :func:`cl_optax.losses.masked_cross_entropy`,
the logit term :func:`cl_optax.losses.der_logit_mse`, the past-head CE a
replay gradient for :func:`cl_optax.experience_replay`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cl_optax._supcon import supcon_loss


def xder_logit_update(
  stored: jax.Array,
  new: jax.Array,
  labels: jax.Array,
  block: jax.Array,
  *,
  gamma: float = 0.85,
  where: jax.Array | None = None,
) -> jax.Array:
  r"""X-DER's "future past" update of stored logits on a block of heads.

  On the block's columns :math:`T = z^{new}_{:, \text{block}}`; with
  :math:`g_i = z^{stored}_{i y_i}` and :math:`m_i = \max_{c \in \text{block}}
  T_{ic}`, where :math:`m_i > g_i` the block is scaled, :math:`T_i \leftarrow
  T_i\,\gamma g_i / m_i`, so the new heads' answer stays below the true
  class's stored logit; then :math:`z^{stored}_{:, \text{block}} \leftarrow T`
  (mammoth ``models/xder.py`` ``update_logits``, :math:`\gamma = 0.85`).
  At the end of task :math:`t` the block is the current and future heads
  (``U(z', f(x'), y, t, T-t)``); for the logits stored for the new items,
  the past heads with ``stored = new`` (``U(out, out, y, 0, t)``).

  As the official code, a row with :math:`g_i \le 0 < m_i` is scaled by a
  negative factor (the block's signs flip); that is kept.

  Args:
    stored: ``[b, C]`` the stored logits.
    new: ``[b, C]`` the current network's logits on the same items.
    labels: int ``[b]``.
    block: bool ``[C]``: the columns to rewrite.
    gamma: :math:`\gamma`.
    where: optional bool ``[b]``: only these rows change.

  Returns:
    The ``[b, C]`` updated stored logits.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> old = jnp.array([[2.0, 0.0, 0.0, 0.0]])
    >>> new = jnp.array([[9.0, 9.0, 4.0, 1.0]])
    >>> cl_optax.losses.xder_logit_update(old, new, jnp.array([0]),
    ...   jnp.array([False, False, True, True]), gamma=0.5)
    Array([[2.  , 0.  , 1.  , 0.25]], dtype=float32)
  """
  stored, new = jnp.asarray(stored), jnp.asarray(new)
  if stored.ndim != 2 or stored.shape != new.shape or labels.shape != stored.shape[:1]:
    raise ValueError(
      "xder_logit_update: `stored` and `new` must be [b, C] and `labels` [b]; got "
      f"{stored.shape}, {new.shape} and {jnp.shape(labels)}."
    )
  block = jnp.asarray(block, jnp.bool_)
  g = jnp.take_along_axis(stored, labels[:, None], axis=-1)
  m = jnp.max(jnp.where(block, new, -jnp.inf), axis=-1, keepdims=True)
  scale = jnp.where(m > g, gamma * g / jnp.where(m > g, m, 1.0), 1.0)
  out = jnp.where(block, new * scale, stored)
  if where is not None:
    out = jnp.where(jnp.asarray(where, jnp.bool_)[:, None], out, stored)
  return out.astype(stored.dtype)


def _mean_where(v: jax.Array, count: jax.Array, weights: jax.Array | None) -> jax.Array:
  """The mean of ``v`` over the rows where ``count`` holds and the weight is not 0 (0 if none)."""
  if weights is not None:
    count = count & (jnp.asarray(weights) != 0)
  n = jnp.sum(count)
  return jnp.where(n > 0, jnp.sum(jnp.where(count, v, 0.0)) / jnp.maximum(n, 1), 0.0)


def xder_future_constraint(
  logits: jax.Array,
  own_mask: jax.Array,
  future_mask: jax.Array,
  *,
  margin: float = 0.3,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""X-DER's future-heads constraint: :math:`\text{mean}_{i: v_i > 0} v_i`.

  .. math::
    v_i = \max_{c \in \text{future}} z_{ic} + m - \max_{c \in \text{own}_i} z_{ic}

  (mammoth ``models/xder.py``, ``--constr_margin 0.3``, weight
  ``--constr_eta 0.1`` to multiply outside), where the own head is the
  current task's head for stream rows and the label's task head for memory
  rows. Rows with :math:`v_i \le 0` (or weight 0) do not count; 0 when none does.

  Args:
    logits: ``[b, C]``.
    own_mask: bool ``[b, C]`` (or ``[C]``): each row's own head.
    future_mask: bool ``[C]``: the heads of the tasks not trained yet.
    margin: :math:`m`.
    weights: optional ``[b]``: rows with weight 0 are left out.

  Returns:
    The scalar loss.
  """
  z = jnp.asarray(logits)
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  own = jnp.broadcast_to(jnp.asarray(own_mask, jnp.bool_), z.shape)
  fut = jnp.max(jnp.where(jnp.asarray(future_mask, jnp.bool_), z, -jnp.inf), axis=-1)
  v = fut + margin - jnp.max(jnp.where(own, z, -jnp.inf), axis=-1)
  return _mean_where(v, v > 0, weights)


def xder_consistency(
  logits: jax.Array,
  labels: jax.Array,
  future_mask: jax.Array,
  *,
  head_size: int,
  temperature: float = 5.0,
  where: jax.Array | None = None,
) -> jax.Array:
  r"""X-DER's future-heads consistency: SupCon on each future head's normalised logits.

  For the ``V`` augmented views of ``N`` items (the current batch and a memory
  batch), each future head :math:`h` (a block of ``head_size`` columns all in
  ``future_mask``) gets :func:`supcon_loss` with ``reduction="sum"`` on its
  L2-normalised logits, and

  .. math::
    L_{cons} = \frac{1}{H_f\,N} \sum_{h \in \text{future}}
      \text{SupCon}_{sum}\bigl(z_{:, :, h} / \lVert z_{:, :, h} \rVert\bigr)

  with :math:`H_f` the number of future heads (aimagelab/mammoth
  ``models/xder.py`` ``observe``, read at ``0d727a7``: ``loss_cons``, summed
  over heads, divided by ``n_heads * batch``, temperature ``--simclr_temp 5``
  for both :math:`\tau` and :math:`\tau_b`; multiply by ``--lambd`` outside,
  0.1 there). 0 when no head is in the future (the last task). ``N`` counts the
  items in ``where``.

  Args:
    logits: ``[N, V, C]``, ``C`` a multiple of ``head_size``.
    labels: int ``[N]``.
    future_mask: bool ``[C]``: the columns of the tasks not trained yet.
    head_size: the classes per task (the heads are consecutive blocks).
    temperature: the SupCon temperature.
    where: optional bool ``[N]``: the items that take part (a memory batch's
      valid rows).

  Returns:
    The scalar loss.
  """
  z = jnp.asarray(logits)
  if z.ndim != 3 or z.shape[-1] % head_size or jnp.shape(future_mask) != z.shape[-1:]:
    raise ValueError(
      "xder_consistency: `logits` must be [items, views, C] with C a multiple of "
      f"head_size {head_size} and `future_mask` [C]; got {z.shape} and {jnp.shape(future_mask)}."
    )
  n, v, c = z.shape
  heads = z.reshape(n, v, c // head_size, head_size).astype(jnp.promote_types(z.dtype, jnp.float32))
  heads = heads / jnp.maximum(jnp.linalg.norm(heads, axis=-1, keepdims=True), 1e-12)
  fut = jnp.all(jnp.asarray(future_mask, jnp.bool_).reshape(-1, head_size), axis=-1)
  per_head = jax.vmap(
    lambda f: supcon_loss(f, labels, temperature=temperature, where=where, reduction="sum"),
    in_axes=2,
  )(heads)
  n_items = n if where is None else jnp.sum(jnp.asarray(where, jnp.bool_))
  n_fut = jnp.sum(fut)
  total = jnp.sum(jnp.where(fut, per_head, 0.0))
  return jnp.where(n_fut > 0, total / jnp.maximum(n_fut * n_items, 1), 0.0)


def xder_rewrite_select(
  indices: jax.Array,
  eligible: jax.Array,
  counter: jax.Array,
  key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  r"""Which sampled memory slots X-DER rewrites this step: the ``1/u`` rule.

  The rows of the step's memory batches (``indices``, both batches
  concatenated) are de-duplicated, the first occurrence of a slot kept; each
  kept eligible row (a valid slot whose label belongs to a past task)
  increments its slot's counter :math:`u`, and is rewritten with probability
  :math:`1/u` (``rand * u < 1``), so a slot drawn often in a task is
  rewritten ever more rarely and each draw's logits are, in expectation,
  weighted alike. The counters are reset to 0 at every task's end
  (aimagelab/mammoth ``models/xder.py``, read at ``0d727a7``: ``observe``'s
  ``umask`` de-duplication, ``update_counter``, and ``end_task``).

  Args:
    indices: int ``[b]``: the sampled flat slot indices
      (:func:`cl_optax.replay.sample_indices` of both memory batches).
    eligible: bool ``[b]``: valid rows whose label is of a past task.
    counter: ``[K]`` the per-slot counters :math:`u` (float or int).
    key: the PRNG key of the draw.

  Returns:
    ``(rewrite, counter)``: bool ``[b]`` (at most one row per slot) and the
    incremented counters.
  """
  idx = jnp.asarray(indices, jnp.int32)
  if idx.ndim != 1 or jnp.shape(eligible) != idx.shape or jnp.ndim(counter) != 1:
    raise ValueError(
      "xder_rewrite_select: `indices` and `eligible` must be [b] and `counter` [K]; got "
      f"{idx.shape}, {jnp.shape(eligible)} and {jnp.shape(counter)}."
    )
  first = jnp.argmax(idx[:, None] == idx[None, :], axis=1) == jnp.arange(idx.shape[0])
  chosen = first & jnp.asarray(eligible, jnp.bool_)
  counter = jnp.asarray(counter)
  counter = counter.at[jnp.where(chosen, idx, counter.shape[0])].add(1, mode="drop")
  u = counter[jnp.clip(idx, 0, counter.shape[0] - 1)].astype(jnp.float32)
  draw = jax.random.uniform(key, idx.shape)
  return chosen & (draw * u < 1.0), counter


def xder_past_constraint(
  logits: jax.Array,
  past_mask: jax.Array,
  current_mask: jax.Array,
  *,
  margin: float = 0.3,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""X-DER's past-heads constraint: the current head's top probability above the past heads'.

  On the softmax over the seen classes (past and current heads),

  .. math::
    v_i = \operatorname{sg}\bigl(\max_{c \in \text{past}} p_{ic}\bigr) + m
      - \max_{c \in \text{current}} p_{ic}, \qquad L = \text{mean}_{i: v_i > 0} v_i

  with the past maximum a constant (stop-gradient), so only the current head
  is pushed up (aimagelab/mammoth ``models/xder.py`` ``observe``, "Past Logits
  Constraint", read at ``0d727a7``, where it is applied from the second task
  on with the future constraint's ``--eta`` and ``--m``; later versions make it
  an option, off by default). 0 when no row has :math:`v_i > 0` or there is no
  past head.

  Args:
    logits: ``[b, C]`` the current batch's logits.
    past_mask: bool ``[C]``: the past tasks' classes.
    current_mask: bool ``[C]``: the current task's classes.
    margin: :math:`m`.
    weights: optional ``[b]``: rows with weight 0 are left out.

  Returns:
    The scalar loss (multiply by :math:`\eta` outside).
  """
  z = jnp.asarray(logits)
  if z.ndim != 2 or jnp.shape(past_mask) != z.shape[-1:] or jnp.shape(current_mask) != z.shape[-1:]:
    raise ValueError(
      "xder_past_constraint: `logits` must be [b, C] and both masks [C]; got "
      f"{z.shape}, {jnp.shape(past_mask)} and {jnp.shape(current_mask)}."
    )
  past = jnp.asarray(past_mask, jnp.bool_)
  cur = jnp.asarray(current_mask, jnp.bool_)
  z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
  p = jax.nn.softmax(jnp.where(past | cur, z, -jnp.inf), axis=-1)
  bad = jax.lax.stop_gradient(jnp.max(jnp.where(past, p, 0.0), axis=-1))
  v = bad + margin - jnp.max(jnp.where(cur, p, 0.0), axis=-1)
  return _mean_where(v, (v > 0) & jnp.any(past), weights)
