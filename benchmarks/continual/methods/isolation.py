"""Parameter isolation: HAT, PackNet, WSN (task-IL; each old task re-measured on its own view).

All three rebuild the base optimiser's state at each task's end, as the three official
codes rebuild theirs (SGD / Adam per task): an old task's head columns then get an
exactly zero update (zero gradient, zero moments), so with PackNet's and WSN's frozen
weights an old task's accuracy cannot move.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from benchmarks.continual import isolation_models
from benchmarks.continual.model import xent
from benchmarks.continual.registry import AuxInit, Method, Step, TaskEnd, register


def _fresh_base(opt_state, index: int):
  """The chain's element ``index`` (the base optimiser) back to its initial (zero) state."""
  return (*opt_state[:index], jax.tree.map(jnp.zeros_like, opt_state[index]),
          *opt_state[index + 1 :])  # fmt: skip


def _task_xent(s: Step, logits) -> jax.Array:
  return xent(logits, s.columns[s.task], s.valid[s.task], s.y).mean()


# ---------------------------------------------------------------- HAT
def _n_gated(params) -> int:
  return sum(1 for k in params if k.startswith("emb"))


def _hat_make(h):
  n = len(h.model.hidden)
  hat = cl_optax.hat([f"layer{i}" for i in range(n)], embeddings=[f"emb{i}" for i in range(n)])
  # the official order: clip_grad_norm(10000), SGD step, mask (here after the optimiser)
  return optax.chain(optax.clip_by_global_norm(1e4), h.base(), hat)


def _hat_init(a: AuxInit):
  """The aux: a copy of the cumulative attention A (the regulariser reads it)."""
  if a.n_tasks > a.hp["max_tasks"]:
    raise ValueError(f"hat: the stream has {a.n_tasks} tasks; --hp max_tasks={a.hp['max_tasks']}.")
  return [jnp.zeros(a.params[f"emb{i}"].shape[1:], jnp.float32) for i in range(_n_gated(a.params))]


def _hat_loss(s: Step, params):
  """CE of the task's head + c R; s annealed 1/s_max -> s_max over each epoch."""
  hp, b = s.hp, s.x.shape[0]
  sv = cl_optax.hat_anneal(s.epoch_index() * b, s.epoch_steps * b, hp["s_max"])
  logits, gates = s.model.forward(
    params, s.x, task=s.task, s=sv, key=s.key, drop=(hp["dropout_in"], hp["dropout"]),
    s_max=hp["s_max"],
  )  # fmt: skip
  return _task_xent(s, logits) + cl_optax.losses.hat_regularizer(gates, s.aux, strength=hp["c"])


def _hat_gates(params, t, s_max):
  return [cl_optax.hat_gate(params[f"emb{i}"][t], s_max, s_max) for i in range(_n_gated(params))]


def _hat_end(e: TaskEnd):
  gates = _hat_gates(e.params, e.task, e.hp["s_max"])
  opt_state = cl_optax.consolidate(e.opt_state, e.params, gates=gates)
  return _fresh_base(opt_state, 1), list(optax.tree.get(opt_state, "hat_attention"))


def _hat_view(params, opt_state, aux, d):
  """Every embedding row set to task ``d``'s: the evaluation forward reads row 0."""
  rows = {k: jnp.broadcast_to(v[d], v.shape) for k, v in params.items() if k.startswith("emb")}
  return {**params, **rows}


def _hat_capacity(params, opt_state, aux, n_tasks):
  """The fraction of the hidden units whose gate of task t is open: sigma(s e) > 1/2 iff
  e > 0, at any s."""
  embs = [params[f"emb{i}"] for i in range(_n_gated(params))]
  return [float(sum(jnp.sum(e[t] > 0) for e in embs) / sum(e.shape[1] for e in embs))
          for t in range(n_tasks)]  # fmt: skip


register(
  Method(
    "hat",
    _hat_make,
    "HAT (Serra et al. 2018): gated MLP, chain(clip 1e4, base, hat), c R loss, task-d gates",
    own_loss=True,
    loss=_hat_loss,
    init_aux=_hat_init,
    end_task=_hat_end,
    eval_view=_hat_view,
    model=isolation_models.gated,
    capacity=_hat_capacity,
    defaults={"s_max": 400.0, "c": 0.75, "dropout_in": 0.0, "dropout": 0.0, "max_tasks": 10},
  )  # fmt: skip
)


# ---------------------------------------------------------------- PackNet
def _packnet_make(h):
  kernels = [f"{name}/kernel" for name in h.model.layers[:-1]]
  pack = cl_optax.packnet(layers=kernels, heads="head", train_biases=bool(h.hp["train_biases"]))
  return optax.chain(h.base(), pack)


def _packnet_fraction(hp, t: int, n_tasks: int) -> float:
  """``prune`` < 0: the equal share 1 - 1/(T - t); else that fraction; the last task: 0."""
  if t == n_tasks - 1:
    return 0.0
  return cl_optax.packnet_share(t, n_tasks) if hp["prune"] < 0 else float(hp["prune"])


def _packnet_finish(e: TaskEnd):
  """Prune (an exact-zero write), retrain the kept weights, freeze them (before the eval)."""
  p = _packnet_fraction(e.hp, e.task, e.n_tasks)
  params, opt_state, aux = e.params, e.opt_state, e.aux
  if p > 0:
    opt_state = cl_optax.consolidate(opt_state, params, prune=p)
    params, opt_state = cl_optax.apply_pending_writes(params, opt_state)
    if e.hp["retrain_epochs"] > 0:
      opt_state = _fresh_base(opt_state, 0)
      params, opt_state, aux = e.retrain(params, opt_state, aux, int(e.hp["retrain_epochs"]))
  opt_state = cl_optax.consolidate(opt_state, params, finish=True)
  return params, _fresh_base(opt_state, 0), aux


def _packnet_capacity(params, opt_state, aux, n_tasks):
  """The fraction of the pruned kernels' entries each task owns."""
  owner = optax.tree.get(opt_state, "packnet_owner")
  flat = np.concatenate([np.ravel(o) for o in jax.tree.leaves(owner)])
  return [float(np.mean(flat == t + 1)) for t in range(n_tasks)]


register(
  Method(
    "packnet",
    _packnet_make,
    "PackNet (Mallya & Lazebnik 2018): chain(base, packnet), prune + retrain, packnet_params",
    finish_task=_packnet_finish,
    eval_view=lambda params, opt_state, aux, d: cl_optax.packnet_params(params, opt_state, d + 1),
    capacity=_packnet_capacity,
    defaults={"prune": -1.0, "retrain_epochs": 5, "train_biases": 0},
  )  # fmt: skip
)


# ---------------------------------------------------------------- WSN
def _kernels(params) -> dict:
  return {k: {"kernel": v["kernel"]} for k, v in params.items() if k.startswith("layer")}


def _trunk_kernels(params):
  """True on the hidden layers' weights (not the scores, not the head)."""
  return {k: jax.tree.map(lambda _, k=k: k.startswith("layer"), v) for k, v in params.items()}


def _wsn_make(h):
  return optax.chain(h.base(), optax.masked(cl_optax.freeze(), _trunk_kernels))


def _wsn_init(a: AuxInit):
  return cl_optax.WSNMasks.create(_kernels(a.params), a.n_tasks)


def _wsn_loss(s: Step, params):
  logits, _ = s.model.forward(params, s.x, task=s.task, keep=s.hp["keep"])
  return _task_xent(s, logits)


def _wsn_masks(params, keep):
  return {
    k: {"kernel": cl_optax.wsn_mask(params[f"scores{k[5:]}"], keep)} for k in _kernels(params)
  }


def _wsn_finish(e: TaskEnd):
  """Store the task's mask, freeze its weights (OR-merged), a fresh base optimiser."""
  masks = _wsn_masks(e.params, e.hp["keep"])
  aux = e.aux.store(e.task, masks)
  imp = jax.tree.map(jnp.zeros_like, e.params) | masks
  opt_state = cl_optax.consolidate(e.opt_state, e.params, importance=imp)
  return e.params, _fresh_base(opt_state, 0), aux


def _wsn_view(params, opt_state, aux, d):
  """The weights under task ``d``'s stored mask (re-measured, never copied)."""
  masks = aux.mask(d)
  return {**params, **{k: {**params[k], "kernel": params[k]["kernel"] * masks[k]["kernel"]}
                       for k in masks}}  # fmt: skip


def _wsn_capacity(params, opt_state, aux, n_tasks):
  """The fraction of the masked weights each task's mask uses."""
  out = []
  for t in range(n_tasks):
    m = jax.tree.leaves(aux.mask(t))
    out.append(float(sum(jnp.sum(x) for x in m) / sum(x.size for x in m)))
  return out


register(
  Method(
    "wsn",
    _wsn_make,
    "WSN (Kang et al. 2022): scored MLP, top-c STE masks, freeze on the kernels, per-task masks",
    own_loss=True,
    loss=_wsn_loss,
    init_aux=_wsn_init,
    finish_task=_wsn_finish,
    eval_view=_wsn_view,
    model=isolation_models.scored,
    capacity=_wsn_capacity,
    defaults={"keep": 0.5},
  )  # fmt: skip
)
