r"""TRGP's pure parts: the trust-region selection and the scaled-weight layer (model side)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TRGPView(NamedTuple):
  """One layer's trust region for one task (:func:`trgp_view`): the input of
  :func:`trgp_scaled_kernel`.

  Attributes:
    bases: ``[top, d_in, width]``, the selected old tasks' bases :math:`M_s`
      (columns beyond each basis's size are 0).
    active: ``[top]`` bool, whether each selected task scales the layer (regime 2).
  """

  bases: jax.Array
  active: jax.Array


def trgp_trust_region(
  grad, task_basis, task, eps: Any = 0.2, *, top: int = 2, official: Any = False
):
  r"""TRGP's trust region for one layer at the start of task ``task`` (Sec. 4.1).

  For each old task :math:`j < t`, the norm of the gradient's projection on its
  subspace, :math:`\lVert \mathrm{Proj}_{S_j}(g) \rVert = \lVert S_j^\top g\rVert_F`;
  the ``top`` old tasks with the largest norms are selected, and a selected
  task is *active* (regime 2: it scales the layer) when its norm exceeds
  :math:`\epsilon_1 \lVert g \rVert_F`.

  Args:
    grad: the layer's gradient ``[d_in, out]`` (a few hundred samples of task ``task``).
    task_basis: ``[max_tasks, d_in, width]``, each task's orthonormal subspace
      (0 columns beyond its size).
    task: the new task's index :math:`t` (old tasks are ``0 .. t-1``).
    eps: :math:`\epsilon_1` (0.2 in the code).
    top: how many old tasks to select (:math:`k = 2` in the code; static).
    official: the code's hard-coded choices, task 1 → ``[0]`` and task 2 →
      ``[1]`` (one task only), instead of the top-``top`` rule.

  Returns:
    ``(selected [top] int32, active [top] bool)``, selected by descending norm;
    slots beyond the number of old tasks are inactive.
  """
  g = jnp.asarray(grad, jnp.float32)
  b = jnp.asarray(task_basis, jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(jnp.einsum("tdw,do->two", b, g)), axis=(1, 2)))
  old = jnp.arange(b.shape[0]) < task
  _, selected = jax.lax.top_k(jnp.where(old, norms, -jnp.inf), top)
  exists = jnp.arange(top) < jnp.minimum(task, top)
  fixed = jnp.zeros((top,), jnp.int32).at[0].set(jnp.where(task == 1, 0, 1))
  quirk = jnp.asarray(official) & ((task == 1) | (task == 2))
  selected = jnp.where(quirk, fixed, selected).astype(jnp.int32)
  exists = jnp.where(quirk, jnp.arange(top) == 0, exists)
  active = exists & (norms[selected] > eps * jnp.linalg.norm(g))
  return selected, active


def trgp_scaled_kernel(kernel, view: TRGPView, q):
  r"""TRGP's scaled weight (Sec. 4.2): :math:`W + \sum_s M_s (Q_s - I) M_s^\top W`.

  A pure model-side function: ``kernel`` is a Flax ``[*in, out]`` kernel
  (flattened as ``kernel.reshape(-1, out)``), ``view`` the layer's
  :class:`TRGPView` for the task (:func:`cl_optax.trgp_view`), and ``q`` the
  task's scaling matrices ``[top, w, w]``, a parameter (identity at the task's
  start) trained by its own optimiser. ``w`` may be narrower than the stored
  bases: only their first ``w`` columns (the most energetic) are scaled, the
  rest as if ``Q`` were the identity there. Inactive slots add nothing. The
  official code's PyTorch form ``W + W M Q M^T - W M M^T`` on ``[out, in]``
  weights is this with ``Q`` transposed.

  Cost: per active slot ``2 d_in w out + w^2 out`` multiply-adds (``M^T W``,
  then ``M (Q - I)`` of it); keep ``w`` at the bases' size, not ``d_in``.
  """
  kernel = jnp.asarray(kernel)
  d_in = int(np.prod(kernel.shape[:-1]))
  top, d_b, width = view.bases.shape
  if q.ndim != 3 or q.shape[0] != top or q.shape[1] != q.shape[2] or q.shape[1] > width:
    raise ValueError(
      f"trgp_scaled_kernel: q has shape {q.shape}; expected ({top}, w, w) with w <= {width} "
      f"(the view's bases are {view.bases.shape})."
    )
  if d_b != d_in:
    raise ValueError(
      f"trgp_scaled_kernel: the kernel of shape {kernel.shape} has {d_in} inputs but the "
      f"view's bases have {d_b} rows."
    )
  w = kernel.reshape(d_in, -1)
  m = view.bases[:, :, : q.shape[1]].astype(w.dtype)
  m = jnp.where(view.active[:, None, None], m, 0.0)
  scaled = jnp.einsum(
    "skj,sjo->sko", q - jnp.eye(q.shape[1], dtype=q.dtype), jnp.einsum("sdk,do->sko", m, w)
  )
  return (w + jnp.einsum("sdk,sko->do", m, scaled)).reshape(kernel.shape)
