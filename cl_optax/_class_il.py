r"""Class-incremental helpers: the seen-classes mask and a cross-entropy restricted to it.

In class-incremental learning one output layer grows its set of classes task
after task. While a task trains, the classes that have not appeared yet have
no examples; the usual practice (and the streams of :mod:`cl_optax.streams`,
``stream.train_valid[t]``) restricts the softmax to the classes seen so far.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks
from cl_optax._distillation import _weighted_mean

# The logit given to a masked class: exp(-1e9 - max) is 0 in float32 and float64, so the
# softmax over the other classes is exact while they stay far from 1e9 in magnitude.
_MASKED_LOGIT = -1e9


def _concrete_ids(ids: jax.Array, where: jax.Array | None) -> np.ndarray | None:
  """The ids that count (``where``), as numpy, or ``None`` under a trace."""
  if not _checks.is_concrete(ids) or (where is not None and not _checks.is_concrete(where)):
    return None
  out = np.asarray(ids)
  if where is not None:
    out = out[np.broadcast_to(np.asarray(where, bool), out.shape)]
  return out.ravel()


def seen_classes_mask(
  classes: jax.Array, num_classes: int, *, where: jax.Array | None = None
) -> jax.Array:
  r"""The bool ``[num_classes]`` mask of the classes that occur in ``classes``.

  With ``classes`` the class ids seen so far (e.g. the classes of the tasks
  trained so far, or every label seen), it is the class-incremental *seen
  classes* mask: :math:`m_c = [\exists i: \text{classes}_i = c]`. Masks of
  several batches or tasks combine with ``|``, so a training loop can carry
  one mask and update it with each batch's labels
  (``seen = seen | seen_classes_mask(y, C)``). Jittable: ``num_classes`` is
  static, ``classes`` and ``where`` may be traced.

  Args:
    classes: integer class ids, any shape (a task's classes, a batch of
      labels).
    num_classes: the number of outputs :math:`C` (a positive int).
    where: optional bool mask broadcastable to ``classes``: only those ids
      count (e.g. the ``valid`` rows of a :func:`cl_optax.replay.sample`).

  Returns:
    A bool ``[num_classes]`` array.

  Raises:
    ValueError: non-integer ids, a ``where`` that does not broadcast to them,
      or (where the ids are concrete) a counted id outside
      ``[0, num_classes)``. Under ``jit`` such an id matches no class.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> seen = cl_optax.losses.seen_classes_mask(jnp.array([0, 1]), 6)  # task 0: classes 0, 1
    >>> seen = seen | cl_optax.losses.seen_classes_mask(jnp.array([3, 2, 3]), 6)  # task 1
    >>> seen.tolist()
    [True, True, True, True, False, False]
  """
  if not isinstance(num_classes, int | np.integer) or num_classes < 1:
    raise ValueError(f"seen_classes_mask: num_classes must be a positive int; got {num_classes!r}.")
  classes = jnp.asarray(classes)
  if not jnp.issubdtype(classes.dtype, jnp.integer):
    raise ValueError(f"seen_classes_mask: `classes` must be integer ids; got {classes.dtype}.")
  if where is not None:
    where = jnp.asarray(where)
    if not _checks.broadcasts_to(where.shape, classes.shape):
      raise ValueError(
        f"seen_classes_mask: `where` of shape {where.shape} does not broadcast to the "
        f"shape {classes.shape} of `classes`."
      )
  ids = _concrete_ids(classes, where)
  if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= num_classes):
    bad = sorted({int(i) for i in ids if not 0 <= i < num_classes})
    raise ValueError(
      f"seen_classes_mask: class ids {bad} are outside [0, {num_classes}) (num_classes)."
    )
  flat = classes.reshape(-1, 1)
  hit = flat == jnp.arange(num_classes, dtype=classes.dtype)
  if where is not None:
    hit = hit & jnp.broadcast_to(where, classes.shape).reshape(-1, 1)
  return jnp.any(hit, axis=0)


def masked_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  class_mask: jax.Array,
  *,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""Softmax cross-entropy over the classes of ``class_mask`` only (class-incremental).

  With ``logits`` :math:`z`, integer ``labels`` :math:`y` and the class mask
  :math:`m` (e.g. :func:`seen_classes_mask`),

  .. math::
    \ell(z, y) = -z_y + \log \sum_{c:\, m_c} e^{z_c} ,

  the cross-entropy of the softmax restricted to the active classes, averaged
  over the examples (weighted by ``weights``). It is computed as optax's
  ``softmax_cross_entropy_with_integer_labels`` of ``where(m, z, -1e9)``: a
  masked class gets a finite, very negative logit, so it takes no probability
  (exactly, while the active logits stay far below :math:`10^9` in magnitude)
  and no gradient, and nothing becomes NaN. An example whose row of the mask is
  all ``False`` contributes 0; one whose label is masked costs about
  :math:`10^9` (refused where the inputs are concrete).

  Args:
    logits: ``[..., C]`` logits (computed in float32 or their wider dtype).
    labels: integer labels of shape ``logits.shape[:-1]``.
    class_mask: bool mask broadcastable to ``[..., C]``: ``[C]`` for one mask
      (the classes seen so far), or one row per example.
    weights: optional weights of the examples (broadcastable to
      ``labels.shape``), e.g. the ``valid`` mask of
      :func:`cl_optax.replay.sample`: the result is then the weighted mean,
      0 when no weight is set.

  Returns:
    The scalar loss.

  Raises:
    ValueError: shapes that do not match, non-integer labels, or (where the
      inputs are concrete) a label of a weighted example outside ``[0, C)`` or
      masked in a row with an active class.

  References:
    van de Ven, Tuytelaars, Tolias, *Three types of incremental learning*,
    Nature Machine Intelligence 2022 (arXiv:1904.07734, "active classes");
    Buzzega et al., *Dark Experience for General Continual Learning*,
    NeurIPS 2020 (class-IL training of DER/DER++).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[2.0, 0.0, 9.0]])  # class 2 is not seen yet
    >>> mask = cl_optax.losses.seen_classes_mask(jnp.array([0, 1]), 3)
    >>> loss = cl_optax.losses.masked_cross_entropy(z, jnp.array([0]), mask)
    >>> round(float(loss), 4)  # log(1 + e^-2): class 2 plays no part
    0.1269
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  class_mask = jnp.asarray(class_mask)
  fn = "masked_cross_entropy"
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
      f"{fn}: `labels` must have the shape {logits.shape[:-1]} of `logits` "
      f"{logits.shape} without its class axis; got {labels.shape}."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: `labels` must be integers; got {labels.dtype}.")
  if class_mask.dtype != jnp.bool_ or not _checks.broadcasts_to(class_mask.shape, logits.shape):
    raise ValueError(
      f"{fn}: `class_mask` must be a bool mask broadcastable to the logits {logits.shape} "
      f"([C] or one row per example); got {class_mask.dtype} {class_mask.shape}."
    )
  if weights is not None:
    weights = jnp.asarray(weights)
    if not _checks.broadcasts_to(weights.shape, labels.shape):
      raise ValueError(
        f"{fn}: `weights` of shape {weights.shape} does not broadcast to the labels' "
        f"shape {labels.shape}."
      )
  mask = jnp.broadcast_to(class_mask, logits.shape)
  _check_labels(fn, labels, mask, weights)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  z = jnp.where(mask, logits.astype(dtype), _MASKED_LOGIT)
  per_example = optax.softmax_cross_entropy_with_integer_labels(z, labels)
  per_example = jnp.where(jnp.any(mask, axis=-1), per_example, 0.0)
  return _weighted_mean(per_example, weights)


def _check_labels(fn: str, labels: jax.Array, mask: jax.Array, weights: jax.Array | None) -> None:
  """Where concrete: every weighted example's label lies in ``[0, C)`` and is active."""
  if not all(_checks.is_concrete(a) for a in (labels, mask, weights) if a is not None):
    return
  y, m = np.asarray(labels), np.asarray(mask)
  counted = np.ones(y.shape, bool)
  if weights is not None:
    counted = np.broadcast_to(np.asarray(weights) != 0, y.shape)
  c = m.shape[-1]
  out = counted & ((y < 0) | (y >= c))
  if out.any():
    raise ValueError(f"{fn}: labels {sorted(set(y[out].tolist()))} are outside [0, {c}).")
  active = np.take_along_axis(m, np.clip(y, 0, c - 1)[..., None], axis=-1)[..., 0]
  off = counted & ~active & m.any(axis=-1)  # a row with no active class contributes 0
  if off.any():
    raise ValueError(
      f"{fn}: labels {sorted(set(y[off].tolist()))} are masked out by `class_mask` "
      "(a weighted example's label must be an active class)."
    )
