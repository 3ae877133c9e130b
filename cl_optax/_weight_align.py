r"""WA's weight aligning as a boundary write: :func:`weight_align`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cl_optax import _trees


def weight_align(
  params: optax.Params,
  head: str,
  *,
  old_classes: jax.Array,
  new_classes: jax.Array,
) -> tuple[Any, Any, jax.Array]:
  r"""Weight aligning (Zhao et al., CVPR 2020): new classes' head columns times the norm ratio.

  .. math::
    \gamma = \frac{\operatorname{mean}_{c \in \text{old}} \lVert W_c \rVert_2}
                  {\operatorname{mean}_{c \in \text{new}} \lVert W_c \rVert_2},
    \qquad W_c \leftarrow \gamma W_c \quad (c \in \text{new})

  with :math:`W_c` the head kernel's column of class :math:`c` (Flax
  ``[d, C]``; PyTorch's rows), computed from the weights *after* the task's
  training; the bias is left alone (G-U-N/PyCIL ``utils/inc_net.py``
  ``weight_align``, applied after each task from the second on). A third-party
  port (hugoycj/Incremental-Learning-with-Weight-Aligning) takes the inverse
  ratio, which amplifies the bias; this is the paper's and PyCIL's.

  The change is returned as a boundary write, not applied: pass it to
  :func:`cl_optax.consolidate` for a :func:`cl_optax.boundary_writes` last in
  the chain (and :func:`cl_optax.apply_pending_writes` to evaluate at once),
  so it runs under ``jit`` and is checkpointed with the optimiser state.

  Args:
    params: the parameters (a pytree).
    head: the ``/``-joined path of the head kernel (``"head/kernel"``), class
      axis last.
    old_classes: bool ``[C]``, the classes of the previous tasks.
    new_classes: bool ``[C]``, the classes of the task just trained.

  Returns:
    ``(writes, write_mask, gamma)``: the ``writes=`` / ``write_mask=``
    signals (the head's new columns, nothing elsewhere) and :math:`\gamma`
    (1 when either set is empty).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"head": {"kernel": jnp.array([[1.0, 4.0]]), "bias": jnp.zeros(2)}}
    >>> tx = optax.chain(optax.sgd(0.1), cl_optax.boundary_writes())
    >>> state = tx.init(params)
    >>> w, m, gamma = cl_optax.weight_align(params, "head/kernel",
    ...   old_classes=jnp.array([True, False]), new_classes=jnp.array([False, True]))
    >>> state = cl_optax.consolidate(state, params, writes=w, write_mask=m)
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> params["head"]["kernel"].tolist(), float(gamma)
    ([[1.0, 1.0]], 0.25)
  """
  paths = _trees.leaf_paths(params)
  if head not in paths:
    raise ValueError(f"weight_align: no parameter at {head!r}; the paths are {paths}.")
  old = jnp.asarray(old_classes, jnp.bool_)
  new = jnp.asarray(new_classes, jnp.bool_)
  out: dict[str, Any] = {}

  def leaf(path, p):
    if _trees.leaf_path(path) != head:
      return jnp.zeros((), p.dtype), jnp.zeros((), jnp.bool_)
    if p.ndim < 1 or p.shape[-1] != new.shape[0] or old.shape != new.shape:
      raise ValueError(
        f"weight_align: the head {head!r} has shape {p.shape}; the class masks must be "
        f"[{p.shape[-1] if p.ndim else '?'}]; got {old.shape} and {new.shape}."
      )
    norms = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32)), axis=tuple(range(p.ndim - 1))))
    mean_old = jnp.sum(jnp.where(old, norms, 0.0)) / jnp.maximum(jnp.sum(old), 1)
    mean_new = jnp.sum(jnp.where(new, norms, 0.0)) / jnp.maximum(jnp.sum(new), 1)
    ok = jnp.any(old) & jnp.any(new) & (mean_new > 0)
    gamma = jnp.where(ok, mean_old / jnp.where(mean_new > 0, mean_new, 1.0), 1.0)
    out["gamma"] = gamma
    mask = jnp.broadcast_to(new, (1,) * (p.ndim - 1) + new.shape)
    return (p.astype(jnp.float32) * gamma).astype(p.dtype), mask

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  pairs = [leaf(path, p) for path, p in flat]
  writes = jax.tree.unflatten(treedef, [w for w, _ in pairs])
  mask = jax.tree.unflatten(treedef, [m for _, m in pairs])
  return writes, mask, out["gamma"]
