"""Importance masking: SPG soft masks and hard (frozen) masks from SPG importance."""

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.model import is_head
from benchmarks.continual.registry import Method, TaskEnd, register


def spg_importance(end: TaskEnd):
  """``importance.spg`` of the task just trained, through every head trained so far."""
  task = end.task
  cols, valid = end.heads.columns, end.heads.valid
  if (cols == cols[0]).all() and (valid == valid[0]).all() and task > 1:
    # One shared head (domain-incremental): every old head's sum-of-logits loss is the
    # same function, so heads 1..t-1 repeat head 0; SPG with task=1 gives the same max.
    task = 1
  return cl_optax.importance.spg(
    end.heads.logits, end.params, cl_optax.importance.Batches(*end.batches), task=task
  )


def _consolidate_spg(end: TaskEnd):
  return cl_optax.consolidate(end.opt_state, end.params, importance=spg_importance(end)), end.aux


def _consolidate_spg_trunk(end: TaskEnd):
  """SPG importance with the output layer set to 0 (the heads never freeze)."""
  imp = spg_importance(end)
  imp = jax.tree.map(lambda i, h: jnp.zeros_like(i) if h else i, imp, is_head(imp))
  return cl_optax.consolidate(end.opt_state, end.params, importance=imp), end.aux


register(
  Method(
    "soft_mask",
    lambda h: optax.chain(h.base(), cl_optax.soft_mask(head=h.model.is_head)),
    "SPG soft masks (Konishi et al. 2023): chain(base, soft_mask), importance.spg per task",
    end_task=_consolidate_spg,
  )
)
register(
  Method(
    "freeze",
    lambda h: optax.chain(h.base(), cl_optax.freeze(threshold=h.hp["threshold"])),
    "hard masks: freeze trunk entries whose SPG importance >= threshold",
    end_task=_consolidate_spg_trunk,
    defaults={"threshold": 0.95},
  )
)
