"""Orthogonal projection (OGD, GPM): a basis grown at the end of each task."""

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.model import mlp_layer_inputs
from benchmarks.continual.registry import Hyper, Method, TaskEnd, register


def _consolidate_ogd(e: TaskEnd):
  x, y = e.examples(e.hp["samples"])
  # the gradient of the ground-truth logit
  grads = cl_optax.importance.output_gradients(e.heads.task[e.task], e.params, x, y)
  return cl_optax.consolidate(e.opt_state, e.params, output_grads=grads), e.aux


def _gpm_layers(h: Hyper):
  h.model.layers  # noqa: B018 -- the MLP only: other models raise a clear error here

  def labels(params):
    heads = h.model.is_head(params)
    return jax.tree.map(
      lambda p, hd: jnp.ndim(p) >= 2 and (h.hp["project_head"] or not hd), params, heads
    )

  return labels


def _consolidate_gpm(e: TaskEnd):
  x, _ = e.examples(e.hp["samples"])
  reps = mlp_layer_inputs(e.params, x)
  if not e.hp["project_head"]:
    reps = {k: v for k, v in reps.items() if k != "head"}
  thr = e.hp["thresholds"]  # per layer, in order (the paper's PMNIST: 0.95, 0.99, 0.99)
  gpm_thr = {k: {"kernel": float(thr[min(i, len(thr) - 1)])} for i, k in enumerate(reps)}
  state = cl_optax.consolidate(e.opt_state, e.params, representations=reps, threshold=gpm_thr)
  return state, e.aux


register(
  Method(
    "ogd",
    lambda h: optax.chain(cl_optax.ogd(h.hp["max_directions"]), h.base()),
    "OGD (Farajtabar et al. 2020): ground-truth-logit gradients of `samples` examples per task",
    end_task=_consolidate_ogd,
    # the basis is max_directions x the model: (tasks - 1) * samples must fit
    defaults={"samples": 200, "max_directions": 800},
  )
)
register(
  Method(
    "gpm",
    lambda h: optax.chain(
      cl_optax.gpm(layers=_gpm_layers(h), freeze_unprojected=h.hp["project_head"]), h.base()
    ),
    "GPM (Saha et al. 2021): input-space bases from mlp_layer_inputs of 300 examples per task",
    end_task=_consolidate_gpm,
    # multi-head streams: the head (one column block per task) is not projected
    defaults={"samples": 300, "thresholds": [0.97], "project_head": False},
  )
)
