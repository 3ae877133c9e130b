r"""The supervised contrastive loss (Khosla et al., NeurIPS 2020), as X-DER calls it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def supcon_loss(
  features: jax.Array,
  labels: jax.Array,
  *,
  temperature: float = 0.07,
  base_temperature: float | None = None,
  where: jax.Array | None = None,
  reduction: str = "mean",
) -> jax.Array:
  r"""Supervised contrastive loss over ``V`` views of ``N`` items (SupCon, "all" mode).

  Every view :math:`a` of every item is an anchor; its positives :math:`P(a)`
  are the other views of items with the same label (its own other views
  included), its contrasts :math:`A(a)` every view but itself:

  .. math::
    \ell_a = -\frac{\tau}{\tau_b} \frac{1}{|P(a)|} \sum_{p \in P(a)}
      \log \frac{e^{f_a \cdot f_p / \tau}}{\sum_{k \in A(a)} e^{f_a \cdot f_k / \tau}},
    \qquad L_i = \frac{1}{V} \sum_{v} \ell_{(v, i)}

  and the loss is :math:`\text{mean}_i L_i` (``"mean"``) or :math:`\sum_i L_i`
  (``"sum"``, what X-DER uses). The features are used as given: normalise
  them first (X-DER: each head's logits, L2-normalised). This is
  HobbitLong/SupContrast ``losses.py`` ``SupConLoss`` with
  ``contrast_mode='all'``, as copied into aimagelab/mammoth
  ``utils/simclrloss.py`` (read at ``0d727a7``), row max subtracted for
  stability as there.

  Departure: ``where`` drops items (padding rows of a memory batch) from the
  anchors *and* the contrasts, which the reference has no need for (its
  batches have no padding); an anchor with no positive (one view, no other
  item of its class) contributes 0 instead of the reference's NaN.

  Args:
    features: ``[N, V, D]``.
    labels: int ``[N]``.
    temperature: :math:`\tau`.
    base_temperature: :math:`\tau_b` (default :math:`\tau`, so the factor is
      1; SupContrast's default is 0.07 for both).
    where: optional bool ``[N]``: the items that take part.
    reduction: ``"mean"`` over the taking-part items or ``"sum"``.

  Returns:
    The scalar loss (0 when no item takes part).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> f = jnp.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    >>> loss = cl_optax.losses.supcon_loss(f, jnp.array([0, 1]), temperature=1.0)
    >>> round(float(loss), 4)  # -log(e / (e + 2)): one positive, two contrasts
    0.5514
  """
  f = jnp.asarray(features)
  if f.ndim != 3 or jnp.shape(labels) != f.shape[:1]:
    raise ValueError(
      "supcon_loss: `features` must be [items, views, dim] and `labels` [items]; got "
      f"{f.shape} and {jnp.shape(labels)}."
    )
  if reduction not in ("mean", "sum"):
    raise ValueError(f"supcon_loss: `reduction` must be 'mean' or 'sum'; got {reduction!r}.")
  n, v, _ = f.shape
  f = f.astype(jnp.promote_types(f.dtype, jnp.float32))
  ok = jnp.ones((n,), jnp.bool_) if where is None else jnp.asarray(where, jnp.bool_)
  flat = jnp.swapaxes(f, 0, 1).reshape(v * n, -1)  # view-major, as torch.cat(unbind(f, 1))
  lab = jnp.tile(jnp.asarray(labels), v)
  okf = jnp.tile(ok, v)
  logits = flat @ flat.T / temperature
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
  contrast = okf[None, :] & ~jnp.eye(v * n, dtype=jnp.bool_)
  positive = contrast & (lab[:, None] == lab[None, :])
  denom = jnp.sum(jnp.where(contrast, jnp.exp(logits), 0.0), axis=1, keepdims=True)
  log_prob = logits - jnp.log(jnp.where(denom > 0, denom, 1.0))
  count = jnp.sum(positive, axis=1)
  mean_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(count, 1)
  scale = temperature / (temperature if base_temperature is None else base_temperature)
  per_anchor = jnp.where(okf & (count > 0), -scale * mean_pos, 0.0)
  per_item = per_anchor.reshape(v, n).mean(0)
  total = jnp.sum(per_item)
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(ok), 1)
