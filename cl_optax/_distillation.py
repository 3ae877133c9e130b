r"""Loss terms of the distillation methods: DER's logit replay and LwF's distillation.

Both terms read the *current* parameters' outputs (on memory inputs for DER,
on the current batch for LwF) and pull them to targets recorded earlier, so
they are losses: the user adds them to the task loss and one backward pass
gives the whole gradient. (A term that reads only stored examples and labels,
ER's cross-entropy on the memory, is a second gradient instead: see
:func:`cl_optax.experience_replay`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weighted_mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean over every axis; with ``weights``, ``sum(w l) / sum(w)`` (0 when ``sum(w) == 0``)."""
  if weights is None:
    return jnp.mean(per_example)
  w = jnp.broadcast_to(jnp.asarray(weights, per_example.dtype), per_example.shape)
  total = jnp.sum(w)
  safe = jnp.where(total != 0, total, 1.0)
  return jnp.where(total != 0, jnp.sum(w * per_example) / safe, 0.0)


def _check_logits(a: jax.Array, b: jax.Array, fn: str, names: tuple[str, str]) -> None:
  if a.ndim < 1 or a.shape != b.shape:
    raise ValueError(
      f"{fn}: `{names[0]}` and `{names[1]}` must have the same shape [..., classes]; got "
      f"{a.shape} and {b.shape}."
    )


def der_logit_mse(
  logits: jax.Array, memory_logits: jax.Array, *, weights: jax.Array | None = None
) -> jax.Array:
  r"""Dark Experience Replay's logit-matching term.

  For memory examples :math:`x'` stored with the logits :math:`z'` the network
  gave them when they were seen, and ``logits`` :math:`h_\theta(x')` of the
  current parameters on the same inputs,

  .. math::
    L_{DER} = \frac{1}{|B_M|} \sum_{(x', z') \in B_M} \frac{1}{C}
      \lVert h_\theta(x') - z' \rVert_2^2 ,

  the mean squared error over examples and the :math:`C` logits (the
  official code's ``F.mse_loss``; the paper's Eq. 4 writes the squared norm
  without :math:`1/C`, so the paper's :math:`\alpha` is the code's
  :math:`\alpha / C`). DER's objective is :math:`\ell_{CE}(B) + \alpha
  L_{DER}`; DER++ adds :math:`\beta\,\ell_{CE}` on a second memory batch with
  its labels (Eq. 6), a gradient the user feeds to
  :func:`cl_optax.experience_replay` (``strength=beta``). The memory is a
  :mod:`cl_optax.replay` buffer whose items hold the logits, e.g.
  ``{"x": x, "y": y, "logits": z}`` (reservoir sampling, as in the paper).

  Args:
    logits: ``[..., C]`` current logits on the memory inputs.
    memory_logits: ``[..., C]`` the stored logits (a stop-gradient target).
    weights: optional weights of the examples (shape ``logits.shape[:-1]``),
      e.g. the ``valid`` mask of :func:`cl_optax.replay.sample`: the result
      is then the weighted mean, 0 when no weight is set.

  Returns:
    The scalar loss (float32 or the logits' wider dtype).

  References:
    Buzzega, Boschini, Porrello, Abati, Calderara, *Dark Experience for General
    Continual Learning: a Strong, Simple Baseline*, NeurIPS 2020
    (arXiv:2004.07211), Eqs. 4 and 6; code aimagelab/mammoth ``models/der.py``.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    >>> stored = jnp.array([[1.0, 0.0], [5.0, 5.0]])
    >>> cl_optax.losses.der_logit_mse(z, stored, weights=jnp.array([True, False]))
    Array(2., dtype=float32)
  """
  logits, memory_logits = jnp.asarray(logits), jnp.asarray(memory_logits)
  _check_logits(logits, memory_logits, "der_logit_mse", ("logits", "memory_logits"))
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  diff = logits.astype(dtype) - jax.lax.stop_gradient(memory_logits).astype(dtype)
  return _weighted_mean(jnp.mean(jnp.square(diff), axis=-1), weights)


def _masked_log_softmax(x: jax.Array, where: jax.Array | None) -> jax.Array:
  """``log_softmax`` over the ``where`` entries of the last axis (0 elsewhere; finite
  gradients even for a row with no entry)."""
  if where is None:
    return jax.nn.log_softmax(x, axis=-1)
  where = jnp.broadcast_to(where, x.shape)
  top = jnp.max(jnp.where(where, x, -jnp.inf), axis=-1, keepdims=True)
  shifted = jnp.where(where, x - jnp.where(jnp.isfinite(top), top, 0.0), 0.0)
  total = jnp.sum(jnp.where(where, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  lse = jnp.log(jnp.where(total > 0, total, 1.0))
  return jnp.where(where, shifted - lse, 0.0)


def lwf_distillation(
  logits: jax.Array,
  teacher_logits: jax.Array,
  *,
  temperature: float = 2.0,
  where: jax.Array | None = None,
  weights: jax.Array | None = None,
) -> jax.Array:
  r"""Learning without Forgetting's distillation loss (knowledge distillation).

  With ``teacher_logits`` :math:`t` the outputs of the network as it was
  before the current task (recorded, or computed by a frozen copy of the old
  parameters) on the *current* batch, ``logits`` :math:`z` the current
  outputs on the same inputs and temperature :math:`T`,

  .. math::
    L_{old} = -\frac{1}{|B|} \sum_{x \in B} \sum_c
      \mathrm{softmax}(t / T)_c \, \log \mathrm{softmax}(z / T)_c ,

  Li & Hoiem's Eq. 2 (a cross-entropy to the old model's softened outputs,
  :math:`T = 2`), over the old tasks' output units only (``where``). LwF's
  objective is :math:`\ell_{new} + \lambda_o L_{old}` (Eq. 1, :math:`\lambda_o
  = 1`); with one head per old task, add one term per head. Hinton et al. and
  van de Ven & Tolias (2019) multiply the term by :math:`T^2`, which keeps its
  gradient scale independent of :math:`T`: pass that in :math:`\lambda_o`.

  Args:
    logits: ``[..., C]`` current logits on the current batch.
    teacher_logits: ``[..., C]`` the old model's logits on the same inputs
      (a stop-gradient target).
    temperature: :math:`T` (Li & Hoiem: 2).
    where: optional bool mask broadcastable to ``[..., C]``: the output units
      of the old tasks (class-incremental: the classes seen before the
      current task); both softmaxes run over these units only. A row with no
      unit contributes 0.
    weights: optional weights of the examples (shape ``logits.shape[:-1]``):
      the weighted mean, 0 when no weight is set.

  Returns:
    The scalar loss.

  References:
    Li & Hoiem, *Learning without Forgetting*, ECCV 2016 (TPAMI 2017,
    arXiv:1606.09282), Eqs. 1-2; Hinton, Vinyals, Dean, *Distilling the
    Knowledge in a Neural Network*, 2015; van de Ven & Tolias, *Three
    scenarios for continual learning*, 2019 (code GMvandeVen/continual-learning
    ``utils.loss_fn_kd``).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> z = jnp.array([[0.0, 0.0, 9.0]])
    >>> old = jnp.array([[0.0, 0.0, -9.0]])
    >>> mask = jnp.array([True, True, False])  # the third class is new
    >>> round(float(cl_optax.losses.lwf_distillation(z, old, where=mask)), 4)  # log 2
    0.6931
  """
  logits, teacher_logits = jnp.asarray(logits), jnp.asarray(teacher_logits)
  _check_logits(logits, teacher_logits, "lwf_distillation", ("logits", "teacher_logits"))
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  z = logits.astype(dtype) / temperature
  t = jax.lax.stop_gradient(teacher_logits).astype(dtype) / temperature
  target = jnp.exp(_masked_log_softmax(t, where))
  if where is not None:
    target = jnp.where(jnp.broadcast_to(where, t.shape), target, 0.0)
  per_example = -jnp.sum(target * _masked_log_softmax(z, where), axis=-1)
  return _weighted_mean(per_example, weights)
