"""TRGP (Lin et al. 2022): GPM's projection plus scaled old subspaces, Q per task in the params.

The model is the preset's MLP with a ``trgp_q`` bank (``[n_tasks, top, w, w]`` per projected
layer, identity at init, routed to its own optimiser by ``optax.partition``). Training and
evaluation of task ``t`` use ``W_eff = W + sum_s M_s (Q_s - I) M_s^T W`` over task ``t``'s trust
region (``eval_view``): TRGP needs the task id at test time, also on permuted MNIST.

The trust region of task ``t`` is chosen at the end of task ``t - 1``, as the code does
before training task ``t``: from the gradient of task ``t``'s loss on its first ``samples``
(300) training examples (``TaskEnd.upcoming``) at the weights that start it, and kept in the
aux with a copy of each task's subspace. Training reads the
scaled term in low rank, ``h W + ((h M_s)(Q_s - I)) C_s`` with ``C_s = M_s^T W`` taken at the
task's start (``Q_t = I`` there, so the term is 0 whatever ``C``): ``W``'s update is
projected out of every old subspace, which holds each ``M_s`` (the paper's growth), so
``M_s^T W`` does not move during the task and ``W``'s gradient through the term, which lies
in ``span(M_s)``, is removed by the projection anyway. Evaluation uses the full ``W_eff``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.methods.orthogonal_projection import _consolidate_gpm, _gpm_layers
from benchmarks.continual.model import MLP, mlp_layer_names
from benchmarks.continual.registry import AuxInit, Hyper, Method, Step, TaskEnd, register
from benchmarks.continual.trainer import task_loss

Q = "trgp_q"
LOW = "trgp_low_rank"  # {layer: (M [top, d, w], Q [top, w, w], C [top, w, out])}, training only


def _net(params: dict) -> dict:
  return {k: v for k, v in params.items() if k not in (Q, LOW)}


def _forward(params: dict, x: jax.Array) -> jax.Array:
  """The MLP; with ``params[LOW]``, each layer adds ``((h M)(Q - I)) C``."""
  net, low = _net(params), params.get(LOW, {})
  h = x.reshape(x.shape[0], -1)
  names = mlp_layer_names(len(net))
  for name in names:
    out = h @ net[name]["kernel"] + net[name].get("bias", 0.0)
    if name in low:
      m, q, c = low[name]
      hm = jnp.einsum("nd,sdk->snk", h, m)
      hm = jnp.einsum("snk,skj->snj", hm, q - jnp.eye(q.shape[-1], dtype=q.dtype))
      out = out + jnp.einsum("snj,sjo->no", hm, c)
    h = out if name == names[-1] else jax.nn.relu(out)
  return h


class TRGPMLP(NamedTuple):
  """The preset's MLP with the ``trgp_q`` bank in its params (ignored by ``apply``)."""

  inner: MLP
  hp: dict
  name = "mlp+trgp_q"

  @property
  def layers(self) -> list[str]:
    return self.inner.layers

  def init(self, key, input_shape: tuple[int, ...], d_out: int) -> dict:
    params = self.inner.init(key, input_shape, d_out)
    T, top = self.hp["max_tasks"], self.hp["top"]

    def bank(kernel):
      w = min(int(self.hp["width"]), kernel.shape[0])
      return jnp.broadcast_to(jnp.eye(w), (T, top, w, w))

    return {**params, Q: {k: bank(v["kernel"]) for k, v in params.items()}}

  def apply(self, params: dict, x: jax.Array) -> jax.Array:
    return _forward(params, x)

  def layer_inputs(self, params: dict, x: jax.Array) -> dict:
    return self.inner.layer_inputs(_net(params), x)

  def _with_q(self, labels: dict, params: dict) -> dict:
    return {**labels, Q: jax.tree.map(lambda _: False, params[Q])}

  def is_head(self, params: Any) -> Any:
    return self._with_q(self.inner.is_head(_net(params)), params)

  def layer_labels(self, params: Any) -> Any:
    return self._with_q(self.inner.layer_labels(_net(params)), params)


def _labels(params: dict) -> dict:
  return {k: jax.tree.map(lambda _, k=k: "q" if k == Q else "net", v) for k, v in params.items()}


def _make(h: Hyper):
  trgp = cl_optax.trgp(
    max_tasks=h.hp["max_tasks"],
    eps=h.hp["eps"],
    top=h.hp["top"],
    layers=_gpm_layers(h),
    freeze_unprojected=h.hp["project_head"],
    official=h.hp["official"],
  )
  return optax.partition({"net": optax.chain(trgp, h.base()), "q": h.base()}, _labels)


def _projected(hp: dict, params: dict) -> list[str]:
  return [k for k in _net(params) if hp["project_head"] or k != "head"]


def _init_aux(a: AuxInit):
  T, top, net = a.hp["max_tasks"], a.hp["top"], _net(a.params)
  if a.n_tasks > T:
    raise ValueError(f"trgp: the stream has {a.n_tasks} tasks; --hp max_tasks={T} is fewer.")
  layers = _projected(a.hp, a.params)
  d = {k: net[k]["kernel"].shape[0] for k in layers}
  w = {k: a.params[Q][k].shape[-1] for k in layers}
  out = {k: net[k]["kernel"].shape[-1] for k in layers}
  return {
    "bases": {k: jnp.zeros((T, d[k], d[k])) for k in layers},
    "selected": {k: jnp.zeros((T, top), jnp.int32) for k in layers},
    "active": {k: jnp.zeros((T, top), bool) for k in layers},
    "m": {k: jnp.zeros((top, d[k], w[k])) for k in layers},  # the current task's M_s
    "c": {k: jnp.zeros((top, w[k], out[k])) for k in layers},  # and M_s^T W at its start
  }


def _effective(params: dict, aux: dict, task: Any) -> dict:
  """The parameters task ``task`` is trained and evaluated with: ``W_eff`` per layer."""
  out = dict(params)
  for k, bases in aux["bases"].items():
    q = params[Q][k][task]
    view = cl_optax.TRGPView(bases[aux["selected"][k][task]][:, :, : q.shape[-1]],
                             aux["active"][k][task])  # fmt: skip
    out[k] = {**params[k], "kernel": cl_optax.trgp_scaled_kernel(params[k]["kernel"], view, q)}
  return out


def _select(e: TaskEnd, aux: dict) -> dict:
  """The trust region of the next task ``t + 1`` (the code's ``samples`` = 300 of its
  examples, their loss's gradient at the weights that start it), and the low-rank pieces
  ``M_s``, ``M_s^T W`` of its training forward."""
  t = e.task + 1
  x, y = e.upcoming(e.hp["samples"])
  columns, valid = jnp.asarray(e.heads.columns), jnp.asarray(e.heads.valid)
  loss = task_loss(e.model.apply, columns, valid, t)
  g = jax.grad(lambda p: loss(p, x, y, jnp.full(y.shape, t)))(_net(e.params))
  sel, act, m, c = (dict(aux[n]) for n in ("selected", "active", "m", "c"))
  for k, bases in aux["bases"].items():
    ns, na = cl_optax.trgp_trust_region(g[k]["kernel"], bases, t, e.hp["eps"], top=e.hp["top"],
                                        official=e.hp["official"])  # fmt: skip
    sel[k], act[k] = sel[k].at[t].set(ns), act[k].at[t].set(na)
    m[k] = jnp.where(na[:, None, None], bases[ns][:, :, : m[k].shape[-1]], 0.0)
    c[k] = jnp.einsum("sdk,do->sko", m[k], e.params[k]["kernel"])
  return {**aux, "selected": sel, "active": act, "m": m, "c": c}


def _loss(s: Step, params):
  low = {k: (m, params[Q][k][s.task], s.aux["c"][k]) for k, m in s.aux["m"].items()}
  return s.loss_fn({**params, LOW: low}, s.x, s.y, jnp.full(s.y.shape, s.task))


def _end_task(e: TaskEnd):
  """GPM's growth from the raw W's layer inputs; the task subspaces copied into the aux;
  the next task's trust region."""
  state, aux = _consolidate_gpm(e)
  found = optax.tree.get(state, "trgp_task_basis")
  bases = {k: found[k]["kernel"] for k in aux["bases"]}
  return state, _select(e, {**aux, "bases": bases})


register(
  Method(
    "trgp",
    _make,
    "TRGP (Lin et al. 2022): GPM plus each task's Q over its trust region (needs the task id "
    "at test)",
    end_task=_end_task,
    init_aux=_init_aux,
    loss=_loss,
    own_loss=True,
    eval_view=lambda params, opt_state, aux, d: _effective(params, aux, d),
    model=lambda hidden, bias, hp: TRGPMLP(MLP(hidden, bias), hp),
    defaults={
      "samples": 300,
      "thresholds": [0.97],
      "project_head": False,
      "max_tasks": 10,
      "top": 2,
      "eps": 0.2,
      "width": 128,
      "official": False,
    },
  )
)
