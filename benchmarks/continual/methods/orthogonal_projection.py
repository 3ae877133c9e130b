"""Orthogonal projection (OGD, GPM, SGP, Adam-NSCL): bases or covariances grown at task ends."""

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.registry import Hyper, Method, TaskEnd, register


def _consolidate_ogd(e: TaskEnd):
  x, y = e.examples(e.hp["samples"])
  # the gradient of the ground-truth logit
  grads = cl_optax.importance.output_gradients(e.heads.task[e.task], e.params, x, y)
  return cl_optax.consolidate(e.opt_state, e.params, output_grads=grads), e.aux


def _layer_inputs(model):
  """``model.layer_inputs``, or a clear error for a model object without it."""
  if not hasattr(model, "layer_inputs") or not hasattr(model, "layer_labels"):
    raise ValueError(
      f"gpm: the model {getattr(model, 'name', type(model).__name__)!r} has no "
      "layer_inputs(params, x) (each projected layer's inputs at the path of its kernel) "
      "and layer_labels(params) (True at those kernels); the MLP and any Flax NNX module "
      "(NNXModel: its nnx.Linear and nnx.Conv layers) have them."
    )
  return model.layer_inputs


def _gpm_labels(model, project_head: bool):
  def labels(params):
    heads, kernels = model.is_head(params), model.layer_labels(params)
    return jax.tree.map(lambda k, hd: bool(k) and (project_head or not hd), kernels, heads)

  return labels


def _gpm_layers(h: Hyper):
  _layer_inputs(h.model)
  return _gpm_labels(h.model, h.hp["project_head"])


def _key(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _leaves_in_order(tree: dict, prefix: tuple = ()) -> list:
  """``[(path, leaf)]`` of nested dicts in insertion order (jax.tree sorts dict keys)."""
  out = []
  for k, v in tree.items():
    out += _leaves_in_order(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]
  return out


def _nest(pairs) -> dict:
  out: dict = {}
  for path, v in pairs:
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _consolidate_gpm(e: TaskEnd):
  x, _ = e.examples(e.hp["samples"])
  projected = _gpm_labels(e.model, e.hp["project_head"])(e.params)
  keep = {_key(p) for p, v in jax.tree_util.tree_leaves_with_path(projected) if v}
  # each layer's inputs at the path of its kernel, input to output; the head's only if projected
  reps = [(p, r) for p, r in _leaves_in_order(_layer_inputs(e.model)(e.params, x)) if p in keep]
  thr = e.hp["thresholds"]  # per layer, in order (the paper's PMNIST: 0.95, 0.99, 0.99)
  gpm_thr = [(p, float(thr[min(i, len(thr) - 1)])) for i, (p, _) in enumerate(reps)]
  state = cl_optax.consolidate(
    e.opt_state, e.params, representations=_nest(reps), threshold=_nest(gpm_thr)
  )
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
# gpm_official: the official code's rank rule (one basis column fewer per layer after task 0)
_GPM_DOC = "GPM (Saha et al. 2021): input-space bases from model.layer_inputs of 300 examples/task"
for _name, _official, _doc in [
  ("gpm", False, _GPM_DOC),
  ("gpm_official", True, "GPM with the official code's first-task rank rule (#{cum < eps})"),
]:
  register(
    Method(
      _name,
      lambda h, official=_official: optax.chain(
        cl_optax.gpm(
          layers=_gpm_layers(h),
          freeze_unprojected=h.hp["project_head"],
          official_rank=official,
        ),
        h.base(),
      ),
      _doc,
      end_task=_consolidate_gpm,
      # multi-head streams: the head (one column block per task) is not projected
      defaults={"samples": 300, "thresholds": [0.97], "project_head": False},
    )
  )
register(
  Method(
    "sgp",
    lambda h: optax.chain(
      cl_optax.sgp(
        alpha=h.hp["alpha"], layers=_gpm_layers(h), freeze_unprojected=h.hp["project_head"]
      ),
      h.base(),
    ),
    "SGP (Saha & Roy 2023): GPM's bases, each direction removed by its importance (alpha)",
    end_task=_consolidate_gpm,
    defaults={"samples": 300, "thresholds": [0.97], "project_head": False, "alpha": 10.0},
  )
)


def _consolidate_nscl(e: TaskEnd):
  """The task's covariance: every training batch's mean input per layer (the code) or every
  example's input (the paper), through the raw layer inputs of the whole epoch."""
  xs, _ = e.batches  # [n_batches, B, ...]
  projected = _gpm_labels(e.model, e.hp["project_head"])(e.params)
  keep = {_key(p) for p, v in jax.tree_util.tree_leaves_with_path(projected) if v}
  per_sample = e.hp["covariance"] == "per_sample"
  chunks = []
  for i in range(0, xs.shape[0], 500):  # 500 batches at a time: no copy of every layer's inputs
    part = xs[i : i + 500]
    inputs = _layer_inputs(e.model)(e.params, part.reshape(-1, *part.shape[2:]))
    chunks.append([
      (p, r if per_sample else cl_optax.nscl_batch_means(r, xs.shape[1]))
      for p, r in _leaves_in_order(inputs)
      if p in keep
    ])  # fmt: skip
  reps = [(p, jnp.concatenate([c[j][1] for c in chunks])) for j, (p, _) in enumerate(chunks[0])]
  return cl_optax.consolidate(e.opt_state, e.params, representations=_nest(reps)), e.aux


def _make_nscl(h: Hyper):
  if h.hp["covariance"] not in ("batch_mean", "per_sample"):
    raise ValueError(
      f"nscl: --hp covariance={h.hp['covariance']!r}; expected 'batch_mean' (the code) "
      "or 'per_sample' (the paper)."
    )
  nscl = cl_optax.nscl(h.hp["a"], normalize=h.hp["normalize"], layers=_gpm_layers(h))
  return optax.chain(h.base(), nscl)


register(
  Method(
    "nscl",
    _make_nscl,
    "Adam-NSCL (Wang et al. 2021): Adam's update in the null space of the old inputs' covariance",
    optimizer="adam",
    end_task=_consolidate_nscl,
    defaults={"a": 10.0, "normalize": True, "covariance": "batch_mean", "project_head": False},
  )
)
