r"""Class-incremental replay losses: ER-ACE, iCaRL, BiC, X-DER.

Loss terms and logit maps over the parts the library has (the replay memory,
:func:`cl_optax.experience_replay`, :func:`cl_optax.losses.lwf_distillation`,
:func:`cl_optax.losses.masked_cross_entropy`): each reads the current model's
logits, so each goes into the user's loss (or, for :func:`bias_correct`, on
the logits the user evaluates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cl_optax._class_il import masked_cross_entropy
from cl_optax._distillation import (
  _check_logits,
  _masked_log_softmax,
  _weighted_mean,
  lwf_distillation,
)


def _check_labels(fn: str, logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
      f"{fn}: `logits` must be [batch, C] and `labels` [batch]; got {logits.shape} and "
      f"{labels.shape}."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: `labels` must be integers; got {labels.dtype}.")


def ace_active_classes(labels: jax.Array, seen: jax.Array, *, where: jax.Array | None = None):
  r"""ER-ACE's active classes for an incoming batch, and the updated seen mask.

  ``present`` = the batch's labels; ``seen ← seen | present``; the active
  classes are :math:`\text{present} \cup \{c \ge \max \text{seen}\}`
  (pclucas14/AML ``methods/er_ace.py``: "unmask unseen classes" is every
  index from the largest seen label on, itself included). That reads "not
  seen yet" only when classes arrive in increasing label order; remap the
  labels otherwise.

  Args:
    labels: int ``[b]`` labels of the incoming batch.
    seen: bool ``[C]`` the classes seen before this batch.
    where: optional bool ``[b]``: the rows that count.

  Returns:
    ``(active, seen)``: bool ``[C]`` each.
  """
  seen = jnp.asarray(seen, jnp.bool_)
  hit = jax.nn.one_hot(labels, seen.shape[0], dtype=jnp.bool_)
  if where is not None:
    hit = hit & jnp.asarray(where, jnp.bool_)[:, None]
  present = jnp.any(hit, axis=0)
  seen = seen | present
  idx = jnp.arange(seen.shape[0])
  top = jnp.max(jnp.where(seen, idx, -1))
  return present | (idx >= top), seen


def ace_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  seen: jax.Array,
  *,
  weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""ER-ACE's asymmetric cross-entropy on the incoming batch (Caccia et al., ICLR 2022).

  .. math::
    L_{in} = \frac{1}{|B|}\sum_{i \in B} -\log
      \frac{e^{z_{i y_i}}}{\sum_{c \in A} e^{z_{ic}}}, \qquad
    A = \{y_i\}_{i \in B} \cup \{c \ge \max \text{seen}\}

  (:func:`ace_active_classes`): the logits of old classes absent from the
  batch are masked, so new-class data cannot push them down. ER-ACE's
  objective is :math:`L_{in} + L_{re}`, :math:`L_{re}` the plain CE over
  all classes on a reservoir batch: its gradient goes to
  :func:`cl_optax.experience_replay` with ``strength=1`` (the official
  ``inc_loss + re_loss``). The official code (pclucas14/AML) is task-free:
  it masks from the first batch on; mammoth's port (``--task_free 0``) uses
  plain CE on task 0: pass ``seen`` all-``False`` and mask nothing there
  if that is wanted. The official model's cosine head is not part of this.

  Args:
    logits: ``[b, C]`` logits on the incoming batch.
    labels: int ``[b]``.
    seen: bool ``[C]``, the classes seen before this batch (carry the
      returned mask to the next step).
    weights: optional ``[b]`` weights (the weighted mean).

  Returns:
    ``(loss, seen)``: the scalar loss and the updated seen mask.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[0.0, 5.0, 0.0, 0.0]])  # class 1 is old, absent from the batch
    >>> seen = jnp.array([True, True, False, False])
    >>> loss, seen = cl_optax.losses.ace_cross_entropy(z, jnp.array([2]), seen)
    >>> round(float(loss), 4), seen.tolist()  # softmax over {2, 3}: log 2
    (0.6931, [True, True, True, False])
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_labels("ace_cross_entropy", logits, labels)
  w = None if weights is None else jnp.asarray(weights) != 0
  active, seen = ace_active_classes(labels, seen, where=w)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logp = _masked_log_softmax(logits.astype(dtype), active)
  per_example = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return _weighted_mean(per_example, weights), seen


def icarl_bce(
  logits: jax.Array,
  labels: jax.Array,
  *,
  teacher_logits: jax.Array | None = None,
  old_mask: jax.Array | None = None,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""iCaRL's classification-and-distillation loss: sigmoid BCE against mixed targets.

  .. math::
    L = \frac{1}{|B|\,C}\sum_{i}\sum_{c} \mathrm{BCE}\big(\sigma(z_{ic}), q_{ic}\big),
    \quad q_{ic} = \begin{cases} \sigma(\hat z_{ic}) & c \in \text{old} \\
    [c = y_i] & \text{otherwise} \end{cases}

  (Rebuffi et al., CVPR 2017, Alg. 3), with :math:`\hat z` the previous
  model's logits on the same inputs (a stop-gradient target) and the mean
  over every unit, unseen ones included (their target is 0, as in the
  official code and mammoth ``models/icarl.py``). Without a teacher it is the
  one-hot BCE of the first task. The official code's :math:`10^{-5}\sum
  \lVert W\rVert^2` goes in the optimiser (``optax.add_decayed_weights(2e-5)``).

  Args:
    logits: ``[b, C]`` current logits (new data and exemplars together).
    labels: int ``[b]``.
    teacher_logits: ``[b, C]`` the previous model's logits, or ``None``.
    old_mask: bool ``[C]``: the classes of the previous tasks.
    weights: optional ``[b]`` example weights.

  Returns:
    The scalar loss.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.zeros((1, 2))
    >>> round(float(cl_optax.losses.icarl_bce(z, jnp.array([1]))), 4)  # log 2
    0.6931
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_labels("icarl_bce", logits, labels)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  target = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
  if teacher_logits is not None:
    teacher_logits = jnp.asarray(teacher_logits)
    _check_logits(logits, teacher_logits, "icarl_bce", ("logits", "teacher_logits"))
    if old_mask is None:
      raise ValueError("icarl_bce: `old_mask` is required with `teacher_logits`.")
    soft = jax.nn.sigmoid(jax.lax.stop_gradient(teacher_logits).astype(dtype))
    target = jnp.where(jnp.asarray(old_mask, jnp.bool_), soft, target)
  per = optax.sigmoid_binary_cross_entropy(logits.astype(dtype), target)
  return _weighted_mean(jnp.mean(per, axis=-1), weights)


def bias_correct(
  logits: jax.Array, beta: jax.Array, gamma: jax.Array, new_mask: jax.Array
) -> jax.Array:
  r"""BiC's bias layer: :math:`q_c = \beta z_c + \gamma` on the newest classes, else :math:`z_c`.

  Wu et al., CVPR 2019, Eq. 5; applied to the newest task's classes only
  (the official TF code, ``resnet.py``; older groups' logits stay raw). Fit
  :math:`(\beta, \gamma)` (init 1, 0) on a held-out, class-balanced slice of
  the memory after each task with :func:`bic_bias_loss`; keep them to
  correct the teacher's newest group in the next task.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[1.0, 4.0]])
    >>> cl_optax.losses.bias_correct(z, 0.5, -1.0, jnp.array([False, True]))
    Array([[1., 1.]], dtype=float32)
  """
  logits = jnp.asarray(logits)
  return jnp.where(jnp.asarray(new_mask, jnp.bool_), beta * logits + gamma, logits)


def bic_bias_loss(
  beta_gamma: jax.Array,
  logits: jax.Array,
  labels: jax.Array,
  new_mask: jax.Array,
  seen_mask: jax.Array,
  *,
  gamma_decay: float = 0.1,
) -> jax.Array:
  r"""BiC's stage-2 objective: CE of the corrected logits + :math:`\frac{d}{2}\gamma^2`.

  ``beta_gamma`` is ``[β, γ]`` (float ``[2]``; the only trained variables),
  ``logits`` the frozen model's logits on the validation slice; the CE runs
  over the seen classes; ``gamma_decay`` 0.1 is the official
  ``0.1 * tf.nn.l2_loss(γ)`` (mammoth's port has none).
  """
  beta, gamma = beta_gamma[0], beta_gamma[1]
  q = bias_correct(jax.lax.stop_gradient(logits), beta, gamma, new_mask)
  return masked_cross_entropy(q, labels, seen_mask) + 0.5 * gamma_decay * jnp.square(gamma)


def bic_loss(
  logits: jax.Array,
  labels: jax.Array,
  teacher_logits: jax.Array,
  *,
  task: int | jax.Array,
  old_mask: jax.Array,
  seen_mask: jax.Array,
  temperature: float = 2.0,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""BiC's stage-1 loss: :math:`\lambda L_d + (1-\lambda) L_{CE}`, :math:`\lambda = t/(t+1)`.

  :math:`t` is the number of old tasks (``task``, 0-based index of the
  current one), :math:`L_d` LwF's distillation at temperature 2 over the old
  classes (:func:`cl_optax.losses.lwf_distillation`, no :math:`T^2`, as the
  official code), :math:`L_{CE}` over the seen classes. The teacher's logits
  should already carry the previous bias correction on its newest group
  (:func:`bias_correct`). Mammoth's ``bic`` weights the distillation by
  :math:`1/(t+1)` instead, the opposite direction from :math:`t = 2` on; this
  follows the paper (Eq. 3) and the official code.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[0.0, 0.0, 2.0]])
    >>> l = cl_optax.losses.bic_loss(z, jnp.array([2]), z, task=0,
    ...   old_mask=jnp.array([False] * 3), seen_mask=jnp.array([True] * 3))
    >>> round(float(l), 4)  # task 0: the CE alone
    0.2395
  """
  lam = jnp.asarray(task, jnp.float32) / (jnp.asarray(task, jnp.float32) + 1.0)
  ce = masked_cross_entropy(logits, labels, seen_mask, weights=weights)
  kd = lwf_distillation(
    logits, teacher_logits, temperature=temperature, where=old_mask, weights=weights
  )
  return lam * kd + (1.0 - lam) * ce
