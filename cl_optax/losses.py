r"""Auxiliary losses that some continual-learning methods add to the task loss.

These are not gradient transformations: they go into the user's loss, and the
optimiser side of the method (e.g. :func:`cl_optax.soft_mask`) stays separate:
DAS's contrastive loss, DER's logit replay (:func:`der_logit_mse`; DER++ adds
:func:`cl_optax.experience_replay`) and LwF's distillation
(:func:`lwf_distillation`). For class-incremental training,
:func:`seen_classes_mask` and :func:`masked_cross_entropy` restrict the
softmax to the classes seen so far (``examples/flax_derpp.py`` puts them
together with DER++). The class-incremental replay methods' terms: ER-ACE's
:func:`ace_cross_entropy`, iCaRL's :func:`icarl_bce`, BiC's :func:`bic_loss`,
:func:`bias_correct` and :func:`bic_bias_loss`, X-DER's
:func:`xder_logit_update`, :func:`xder_rewrite_select`,
:func:`xder_future_constraint`, :func:`xder_past_constraint` and
:func:`xder_consistency` (on
:func:`supcon_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cl_optax._class_il import masked_cross_entropy as masked_cross_entropy
from cl_optax._class_il import seen_classes_mask as seen_classes_mask
from cl_optax._class_il_losses import ace_active_classes as ace_active_classes
from cl_optax._class_il_losses import ace_cross_entropy as ace_cross_entropy
from cl_optax._class_il_losses import bias_correct as bias_correct
from cl_optax._class_il_losses import bic_bias_loss as bic_bias_loss
from cl_optax._class_il_losses import bic_loss as bic_loss
from cl_optax._class_il_losses import icarl_bce as icarl_bce
from cl_optax._distillation import der_logit_mse as der_logit_mse
from cl_optax._distillation import lwf_distillation as lwf_distillation
from cl_optax._hat import hat_regularizer as hat_regularizer
from cl_optax._supcon import supcon_loss as supcon_loss
from cl_optax._xder import xder_consistency as xder_consistency
from cl_optax._xder import xder_future_constraint as xder_future_constraint
from cl_optax._xder import xder_logit_update as xder_logit_update
from cl_optax._xder import xder_past_constraint as xder_past_constraint
from cl_optax._xder import xder_rewrite_select as xder_rewrite_select

__all__ = [
  "ace_active_classes",
  "ace_cross_entropy",
  "bias_correct",
  "bic_bias_loss",
  "bic_loss",
  "das_contrastive",
  "der_logit_mse",
  "hat_regularizer",
  "icarl_bce",
  "lwf_distillation",
  "masked_cross_entropy",
  "seen_classes_mask",
  "supcon_loss",
  "xder_consistency",
  "xder_future_constraint",
  "xder_logit_update",
  "xder_past_constraint",
  "xder_rewrite_select",
]


def _cosine(a: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  """``cos(a_i, b_j)`` for all pairs, each norm clamped below at ``eps`` (torch's rule)."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return a @ b.T


def das_contrastive(
  anchor: jax.Array,
  positive: jax.Array,
  negative: jax.Array | None = None,
  *,
  temperature: float = 0.05,
  eps: float = 1e-8,
) -> jax.Array:
  r"""DAS's contrastive integration loss (SimCSE-style InfoNCE with extra negatives).

  For pooled representations ``anchor`` :math:`a`, ``positive`` :math:`p`
  (two dropout passes of the full model) and ``negative`` :math:`n` (a pass
  with the gates set to the accumulated importance, the "previous knowledge"
  sub-network):

  .. math::
    L = -\frac{1}{B}\sum_i \log
      \frac{e^{\cos(a_i, p_i)/\tau}}
           {\sum_j e^{\cos(a_i, p_j)/\tau} + \sum_j e^{\cos(a_i, n_j)/\tau}}

  so each anchor is pulled to its own positive and pushed from the other
  positives and from *all* the importance-masked representations (the full
  representation learns what the old-knowledge sub-network lacks). Without
  ``negative`` it is the SimCSE loss. Add it to the LM loss (the official
  weight is 1).

  It is a loss, not an optimiser transform: it needs forward passes with
  gates, which only the model can do, so it lives here for the user's loss
  function (see ``examples/continual_pretraining.py``).

  Args:
    anchor: ``[B, D]`` pooled representations (e.g. mean over tokens of the
      last hidden states).
    positive: ``[B, D]``, the second dropout pass.
    negative: optional ``[N, D]`` extra negatives (the masked pass).
    temperature: :math:`\tau` (official 0.05).
    eps: lower bound of each norm in the cosine (as ``torch.nn.CosineSimilarity``).

  Returns:
    The scalar mean cross-entropy.

  References:
    Ke et al., *Continual Pre-training of Language Models*, ICLR 2023 (arXiv:2210.05549), Sec. 3;
    code UIC-Liu-Lab/ContinualLM ``networks/baselines/simcse.py``
    ``sequence_level_contrast`` (called with the two full passes and the
    masked pass in ``networks/posttrain/model.py``); Gao et al., *SimCSE*, 2021.
  """
  anchor, positive = jnp.asarray(anchor), jnp.asarray(positive)
  if anchor.ndim != 2 or positive.shape != anchor.shape:
    raise ValueError(
      "das_contrastive: `anchor` and `positive` must both be [batch, features]; got "
      f"{anchor.shape} and {positive.shape}."
    )
  logits = _cosine(anchor, positive, eps)
  if negative is not None:
    negative = jnp.asarray(negative)
    if negative.ndim != 2 or negative.shape[1] != anchor.shape[1]:
      raise ValueError(
        f"das_contrastive: `negative` must be [n, {anchor.shape[1]}]; got {negative.shape}."
      )
    logits = jnp.concatenate([logits, _cosine(anchor, negative, eps)], axis=1)
  logits = logits.astype(jnp.float32) / temperature
  labels = jnp.arange(anchor.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
