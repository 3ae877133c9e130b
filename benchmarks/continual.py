"""Continual-learning benchmark: a stream x methods -> accuracy matrices, table, JSON, plots.

  python -m benchmarks.continual                                  # split digits, landed methods
  python -m benchmarks.continual --stream pmnist-agem --methods sgd --seeds 5 --data ../shared/data
  python -m benchmarks.continual --stream split-mnist --scenario class --methods adam,soft_mask

Each task trains in ONE jitted `lax.scan` over its batches (the optimiser, the
method's per-step side inputs and the progress ticks all run inside it); a
method's end-of-task work (importance estimation, `cl_optax.consolidate`) runs
between tasks. Results: a table in the terminal, `results.jsonl` (one line per
method and seed, with the full accuracy matrix and samples/s), and PNG plots
(accuracy-matrix heatmap per method; average accuracy vs tasks seen).

Add a method with ONE `register(Method(...))` entry (see `Method` and
benchmarks/ADDING_METHODS.md); add a protocol with one `PRESETS` entry.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from cl_optax import metrics, streams

PyTree = Any

# ------------------------------------------------------------------- model


def mlp_layer_names(n_layers: int) -> list[str]:
  """``layer0, layer1, ..., head``: the keys of an MLP with ``n_layers`` dense layers."""
  return [f"layer{i}" for i in range(n_layers - 1)] + ["head"]


INITS = ("torch", "agem")


def mlp_init(key, sizes: tuple[int, ...], *, bias: bool = True, init: str = "torch") -> dict:
  """MLP parameters.

  ``init="torch"``: PyTorch's default Linear init, U(+-1/sqrt(fan_in)) for kernels and biases.
  ``init="agem"``: the A-GEM code's (facebookresearch/agem, model/model.py ``weight_variable``,
  ``bias_variable``): kernels from TF's ``truncated_normal_initializer(stddev=0.1)`` (a normal
  of std 0.1 redrawn outside +-2 std), biases the constant 0.1.
  """
  if init not in INITS:
    raise ValueError(f"mlp_init: init must be one of {INITS}; got {init!r}.")
  params = {}
  keys = jax.random.split(key, 2 * (len(sizes) - 1))
  names = mlp_layer_names(len(sizes) - 1)
  for i, (name, m, k) in enumerate(zip(names, sizes[:-1], sizes[1:])):
    if init == "agem":
      layer = {"kernel": 0.1 * jax.random.truncated_normal(keys[2 * i], -2.0, 2.0, (m, k))}
      if bias:
        layer["bias"] = jnp.full((k,), 0.1, jnp.float32)
    else:
      bound = 1.0 / np.sqrt(m)
      layer = {"kernel": jax.random.uniform(keys[2 * i], (m, k), jnp.float32, -bound, bound)}
      if bias:
        layer["bias"] = jax.random.uniform(keys[2 * i + 1], (k,), jnp.float32, -bound, bound)
    params[name] = layer
  return params


def mlp_tapped(params: dict, x: jax.Array, taps: dict | None = None) -> tuple[jax.Array, dict]:
  """ReLU MLP (output layer ``head``) -> ``(logits, inputs)``.

  ``inputs[name]`` is the input ``[n, d_in]`` of layer ``name``; ``taps[name]``,
  if given, is added to that layer's output (the ``fn`` contract of
  :func:`cl_optax.importance.kfac_factors`).
  """
  h = x.reshape(x.shape[0], -1)
  inputs = {}
  for name in mlp_layer_names(len(params)):
    layer = params[name]
    inputs[name] = h
    h = h @ layer["kernel"] + layer.get("bias", 0.0)
    if taps is not None:
      h = h + taps[name]
    if name != "head":
      h = jax.nn.relu(h)
  return h, inputs


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
  """ReLU MLP; the output layer is the leaf ``head``."""
  return mlp_tapped(params, x)[0]


def mlp_layer_inputs(params: dict, x: jax.Array) -> dict:
  """The input of every layer at ``x``, at the path of its kernel.

  ``{"layer0": {"kernel": x [n, d_in]}, ..., "head": {"kernel": h [n, d]}}``:
  the ``representations=`` signal GPM's consolidate reads (Saha et al. 2021).
  """
  return {name: {"kernel": h} for name, h in mlp_tapped(params, x)[1].items()}


def is_head(params: PyTree) -> PyTree:
  """Labels (optax.masked style): True on the output layer's leaves."""
  return {k: jax.tree.map(lambda _: k == "head", v) for k, v in params.items()}


def head_logits(logits, columns, valid):
  """Gathers each example's head columns; inactive columns get -1e9."""
  cols = jnp.broadcast_to(columns, logits.shape[:1] + columns.shape[-1:])
  ok = jnp.broadcast_to(valid, cols.shape)
  return jnp.where(ok, jnp.take_along_axis(logits, cols, axis=1), -1e9)


def xent(logits, columns, valid, y):
  return optax.softmax_cross_entropy_with_integer_labels(head_logits(logits, columns, valid), y)


# ----------------------------------------------------------------- methods


class Hyper(NamedTuple):
  """What a method's `make` gets: the optimiser choice and hyper-parameters."""

  optimizer: str  # "sgd" or "adam": the base optimiser of the protocol
  lr: float
  hp: dict  # the method's hyper-parameters (Method.defaults, overridden by --hp)
  is_head: Callable[[PyTree], PyTree]  # labels of the output-layer leaves
  hidden: tuple[int, ...] = ()  # the MLP's hidden widths (layers layer0.., then head)

  def base(self) -> optax.GradientTransformation:
    return BASES[self.optimizer](self.lr)


BASES = {"sgd": optax.sgd, "adam": optax.adam}


class Step(NamedTuple):
  """What a method's `step` hook sees, inside the jitted scan (all traced)."""

  params: PyTree
  x: jax.Array  # the current batch
  y: jax.Array
  task: jax.Array  # int32 scalar, index of the current task
  step: jax.Array  # int32 scalar, step index within the task
  columns: jax.Array  # int32 [n_tasks, k]: output columns of each task
  valid: jax.Array  # bool [n_tasks, k]: active columns while training each task
  aux: PyTree  # the method's own carried state (e.g. a replay memory)
  key: jax.Array  # a fresh PRNG key for this step
  loss_fn: Callable  # loss_fn(params, x, y, task_ids, weights=None) -> (weighted) mean CE
  hp: dict


class AuxInit(NamedTuple):
  """What a method's `init_aux` gets (once per run, before task 0)."""

  params: PyTree
  n_tasks: int
  input_shape: tuple[int, ...]
  columns: np.ndarray
  hp: dict


class TaskEnd(NamedTuple):
  """What a method's `end_task` hook gets after training task `task` (eager)."""

  task: int
  params: PyTree
  opt_state: PyTree
  aux: PyTree
  batches: tuple[jax.Array, jax.Array]  # the task's training data, [n_batches, B, ...]
  logits_fn: Callable  # logits_fn(params, x, head: int) -> logits of task `head`'s columns
  loss_fn: Callable  # loss_fn(params, x, y, task_ids) -> mean cross-entropy
  columns: np.ndarray
  valid: np.ndarray
  hp: dict
  key: jax.Array


class Method(NamedTuple):
  """One registry entry: everything the runner needs to train a method.

  Attributes:
    name: CLI name.
    make: ``Hyper -> optax.GradientTransformation`` (use ``hyper.base()`` for
      the protocol's optimiser).
    doc: one line for ``--list``.
    optimizer: force the base optimiser (``"sgd"``/``"adam"``) whatever the
      protocol says; ``None`` uses the protocol's.
    end_task: ``TaskEnd -> (opt_state, aux)`` between tasks (importance
      estimation + ``cl_optax.consolidate``, memory writes, ...).
    init_aux: ``AuxInit -> aux``: the method's own state carried through the
      scan (a replay memory); ``None`` carries nothing.
    step: ``Step -> (extra_args, aux)`` inside the jitted step, before the
      gradient: extra args for ``tx.update`` (e.g. ``ref_grads`` from the
      memory) and the new aux.
    defaults: the method's hyper-parameters (``--hp name=value`` overrides).
    protocol: per-preset settings, ``{preset: {"lr": ..., **hp}}`` (a key
      ``"preset/scenario"``, e.g. ``"split-mnist/domain"``, adds settings for
      one scenario of a split stream): the
      learning rate and hyper-parameters a paper used for this method on that
      protocol (e.g. A-GEM's lr 0.1 on ``pmnist-agem``); ``--lr``/``--hp`` win.
  """

  name: str
  make: Callable[[Hyper], optax.GradientTransformation]
  doc: str = ""
  optimizer: str | None = None
  end_task: Callable[[TaskEnd], tuple[PyTree, PyTree]] | None = None
  init_aux: Callable[[AuxInit], PyTree] | None = None
  step: Callable[[Step], tuple[dict, PyTree]] | None = None
  defaults: dict = {}
  protocol: dict = {}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"register: a method named {method.name!r} is already registered.")
  METHODS[method.name] = method
  return method


def _spg_importance(end: TaskEnd) -> PyTree:
  task = end.task
  shared = (end.columns == end.columns[0]).all() and (end.valid == end.valid[0]).all()
  if shared and task > 1:
    # One shared head (domain-incremental): every old head's sum-of-logits loss is the
    # same function, so heads 1..t-1 repeat head 0; SPG with task=1 gives the same max.
    task = 1
  return cl_optax.importance.spg(end.logits_fn, end.params, end.batches, task=task)


def _consolidate_spg(end: TaskEnd):
  imp = _spg_importance(end)
  return cl_optax.consolidate(end.opt_state, end.params, importance=imp), end.aux


def _consolidate_spg_trunk(end: TaskEnd):
  """SPG importance with the output layer set to 0 (the heads never freeze)."""
  imp = _spg_importance(end)
  heads = is_head(imp)
  imp = jax.tree.map(lambda i, h: jnp.zeros_like(i) if h else i, imp, heads)
  return cl_optax.consolidate(end.opt_state, end.params, importance=imp), end.aux


register(Method("sgd", lambda h: optax.sgd(h.lr), "plain SGD (fine-tuning baseline)", "sgd"))
register(Method("adam", lambda h: optax.adam(h.lr), "plain Adam (fine-tuning baseline)", "adam"))
register(
  Method(
    "soft_mask",
    lambda h: optax.chain(h.base(), cl_optax.soft_mask(head=h.is_head)),
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


# ------------------------------------------- landed methods (issues 4 and 5)
# Replay-based (A-GEM, GEM): a `cl_optax.replay.TaskRing` carried through the scan.
# Each step writes its batch into the current task's ring (the task's most recent
# examples, GEM's rule) and computes the reference gradients from the past tasks'
# memories inside the same jitted step.


def _ring_init(a: AuxInit):
  example = {
    "x": jax.ShapeDtypeStruct((int(np.prod(a.input_shape)),), jnp.float32),
    "y": jax.ShapeDtypeStruct((), jnp.int32),
    "task": jax.ShapeDtypeStruct((), jnp.int32),
  }
  return cl_optax.replay.init(example, a.hp["memory_per_task"], num_tasks=a.n_tasks)


def _ring_write(s: Step):
  batch = {"x": s.x, "y": s.y.astype(jnp.int32), "task": jnp.full(s.y.shape, s.task, jnp.int32)}
  return cl_optax.replay.add(s.aux, batch, task=s.task)


def _agem_step(s: Step):
  """g_ref on `memory_batch` examples drawn from the union of the past tasks' memories."""
  past = jnp.arange(s.columns.shape[0]) < s.task
  m, ok = cl_optax.replay.sample(s.aux, s.key, s.hp["memory_batch"], tasks=past)
  # task 0: no valid row, the weighted loss is 0, g_ref = 0 and agem passes g through
  ref = jax.grad(s.loss_fn)(s.params, m["x"], m["y"], m["task"], ok)
  return {"ref_grads": ref}, _ring_write(s)


def _gem_step(s: Step):
  """One gradient per past task on its whole memory: one vmapped backward pass.

  Only the rings of past tasks are read: a ``lax.switch`` over a few static ring
  counts (at least ``s.task``), zero-padded to all ``T`` rows, so task ``t``
  pays for about ``t`` memories rather than ``T`` (1.9x less over 17 tasks).
  """
  items, full = s.aux.items, cl_optax.replay.filled(s.aux)  # [T, cap, ...], [T, cap]
  n_tasks = s.columns.shape[0]
  grad = jax.grad(s.loss_fn)

  def over_first(w):
    def grads(params, items, full):
      if w == 0:
        return jax.tree.map(lambda p: jnp.zeros((n_tasks, *p.shape), p.dtype), params)
      g = jax.vmap(lambda x, y, t, m: grad(params, x, y, t, m))(
        items["x"][:w], items["y"][:w], items["task"][:w], full[:w]
      )
      return jax.tree.map(lambda a: jnp.pad(a, [(0, n_tasks - w)] + [(0, 0)] * (a.ndim - 1)), g)

    return grads

  step = max(1, -(-n_tasks // 6))
  widths = sorted({0, n_tasks, *range(step, n_tasks, step)})
  index = jnp.searchsorted(jnp.asarray(widths), s.task)  # the first width >= past tasks
  task_grads = jax.lax.switch(index, [over_first(w) for w in widths], s.params, items, full)
  mask = jnp.arange(n_tasks) < s.task
  return {"task_grads": task_grads, "task_mask": mask}, _ring_write(s)


register(
  Method(
    "agem",
    lambda h: optax.chain(cl_optax.agem(), h.base()),
    "A-GEM (Chaudhry et al. 2019): ring memory per task, g_ref from 256 memory examples per step",
    init_aux=_ring_init,
    step=_agem_step,
    defaults={"memory_per_task": 250, "memory_batch": 256},
    protocol={
      "pmnist-agem": {"lr": 0.1},  # replicate_results_iclr19.sh: A-GEM lr 0.1, 25/class
      "pmnist-agem-1k": {"lr": 0.1},
      "pmnist-gem": {"memory_per_task": 256},
      "rmnist-gem": {"memory_per_task": 256},
    },
  )
)
register(
  Method(
    "gem",
    lambda h: optax.chain(cl_optax.gem(h.hp["memory_strength"]), h.base()),
    "GEM (Lopez-Paz & Ranzato 2017): one memory gradient per past task, QP in jit",
    init_aux=_ring_init,
    step=_gem_step,
    defaults={"memory_per_task": 256, "memory_strength": 0.5},
    protocol={
      "pmnist-agem": {"lr": 0.03, "memory_per_task": 250},  # A-GEM script: GEM lr 0.03
      "pmnist-agem-1k": {"lr": 0.03, "memory_per_task": 250},
    },
  )
)


# Importance-weighted penalties (EWC, online EWC, MAS), NCL: an estimator from
# cl_optax.importance on (at most `fisher_n` of) the task's training examples,
# through the task's own head, then `cl_optax.consolidate`.


def _task_batches(e: TaskEnd):
  xs, ys = e.batches
  n = e.hp.get("fisher_n")
  if n is not None:
    k = max(1, -(-int(n) // xs.shape[1]))
    xs, ys = xs[:k], ys[:k]
  return xs, ys


_HEAD_FNS: dict = {}


def _head_fn(e: TaskEnd):
  """``fn(params, x)``: the logits of the task's head; one object per (layout, task), as the
  estimators jit with it as a static argument."""
  k = (id(e.logits_fn), e.task)
  if k not in _HEAD_FNS:
    _HEAD_FNS[k] = (e.logits_fn, functools.partial(e.logits_fn, head=e.task))
  return _HEAD_FNS[k][1]


def _fisher(e: TaskEnd):
  kind = e.hp["fisher"]
  batches = _task_batches(e)
  if kind == "predicted":  # van de Ven's 2019 code: the model's most likely label per example
    xs, _ = batches
    fn = _head_fn(e)
    ys = jnp.stack([jnp.argmax(fn(e.params, x), -1) for x in xs]).astype(jnp.int32)
    batches, kind = (xs, ys), "empirical"
  return cl_optax.importance.fisher_diag(_head_fn(e), e.params, batches, fisher=kind, key=e.key)


def _consolidate_fisher(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params, importance=_fisher(e)), e.aux


def _consolidate_ncl(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params, precision=_fisher(e)), e.aux


_TAPPED_FNS: dict = {}


def _tapped_head_fn(e: TaskEnd):
  """``fn(params, x, taps) -> (task logits, layer inputs)`` for importance.kfac_factors."""
  k = (e.columns.shape, e.columns.tobytes(), e.valid.tobytes(), e.task)
  if k not in _TAPPED_FNS:
    cols, ok = jnp.asarray(e.columns[e.task]), jnp.asarray(e.valid[e.task])

    def fn(params, x, taps):
      logits, inputs = mlp_tapped(params, x, taps)
      return head_logits(logits, cols, ok), inputs

    _TAPPED_FNS[k] = fn
  return _TAPPED_FNS[k]


def _consolidate_ncl_kfac(e: TaskEnd):
  factors = cl_optax.importance.kfac_factors(
    _tapped_head_fn(e),
    e.params,
    _task_batches(e),
    layers=mlp_layer_names(len(e.params)),
    fisher=e.hp["fisher"],
    key=e.key,
  )
  return cl_optax.consolidate(e.opt_state, e.params, precision=factors), e.aux


def _consolidate_mas(e: TaskEnd):
  imp = cl_optax.importance.mas(_head_fn(e), e.params, _task_batches(e))
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), e.aux


def _consolidate_plain(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params), e.aux


# van de Ven, Tuytelaars & Tolias (param_values.py), split MNIST: EWC lambda
# 1e5 / 1e10 / 1e9 and SI c 10 / 5e4 / 5e3 for task / domain / class-IL; their
# Fisher takes the expectation over all labels (fisher_labels="all" = "exact").
_VDV_EWC = {
  "split-mnist/task": {"strength": 1e5},
  "split-mnist/domain": {"strength": 1e10},
  "split-mnist/class": {"strength": 1e9},
  "split-mnist": {"fisher_n": None},  # every training example
  "split-digits/task": {"strength": 1e5},
  "split-digits/domain": {"strength": 1e10},
  "split-digits/class": {"strength": 1e9},
}
# van de Ven & Tolias 2019 (code f0b1461, param_values.py, split MNIST, task / domain / class):
# EWC lambda 1e7 / 1e6 / 1e8, online EWC lambda 1e8 / 1e8 / 1e9 with gamma 0.8 / 0.7 / 0.8, SI c
# 50 / 500 / 0.5; the Fisher of the 2019 code: the predicted label (on every training example there;
# here on 1000 per task, as the split-mnist rows).
# Online EWC's loss there is (lambda / 2) gamma F~ (theta - theta*)^2: strength lambda * gamma.
_VDV19_FISHER = {"fisher": "predicted", "fisher_n": 1000}  # 2019: all examples (12x the cost)
_VDV19_EWC = {
  "split-mnist-2019": _VDV19_FISHER,
  "split-mnist-2019/task": {"strength": 1e7},
  "split-mnist-2019/domain": {"strength": 1e6},
  "split-mnist-2019/class": {"strength": 1e8},
}
_VDV19_OEWC = {
  "split-mnist-2019": _VDV19_FISHER,
  "split-mnist-2019/task": {"strength": 1e8 * 0.8, "decay": 0.8},
  "split-mnist-2019/domain": {"strength": 1e8 * 0.7, "decay": 0.7},
  "split-mnist-2019/class": {"strength": 1e9 * 0.8, "decay": 0.8},
}
# A-GEM's script (PMNIST): EWC lr 0.03, lambda 10; MAS lr 0.1, lambda 0.1; PI (SI) lr 0.1, c 0.1
_AGEM_EWC = {"lr": 0.03, "strength": 10.0}

register(
  Method(
    "ewc",
    lambda h: optax.chain(cl_optax.ewc(h.hp["strength"]), h.base()),
    "EWC (Kirkpatrick et al. 2017): importance.fisher_diag per task, one penalty per task",
    end_task=_consolidate_fisher,
    defaults={"strength": 10.0, "fisher": "exact", "fisher_n": 1000},
    protocol={**_VDV_EWC, **_VDV19_EWC, "pmnist-agem": _AGEM_EWC, "pmnist-agem-1k": _AGEM_EWC},
  )
)
register(
  Method(
    "online_ewc",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], h.hp["decay"]), h.base()),
    "online EWC (Schwarz et al. 2018): running Fisher, latest anchor",
    end_task=_consolidate_fisher,
    defaults={"strength": 10.0, "decay": 1.0, "fisher": "exact", "fisher_n": 1000},
    protocol={**_VDV_EWC, **_VDV19_OEWC, "pmnist-agem": _AGEM_EWC, "pmnist-agem-1k": _AGEM_EWC},
  )
)
_AGEM_MAS = {"lr": 0.1, "strength": 2 * 0.1}  # cl_optax.mas strength = 2 * lambda_p
register(
  Method(
    "mas",
    lambda h: optax.chain(cl_optax.mas(h.hp["strength"]), h.base()),
    "MAS (Aljundi et al. 2018): importance.mas (output-norm gradients) per task",
    end_task=_consolidate_mas,
    defaults={"strength": 2.0, "fisher_n": 1000},
    protocol={"pmnist-agem": _AGEM_MAS, "pmnist-agem-1k": _AGEM_MAS},
  )
)
# The A-GEM code's own "EWC" and "MAS" (facebookresearch/agem, model/model.py and
# fc_permute_mnist.py), which the A-GEM paper's EWC / MAS numbers come from. Both keep ONE
# anchor (the params at the end of the last task, `star_vars`) and the importance of the
# LAST task only, and add lambda * sum(Omega (theta - theta*)^2) (no 1/2) to the mean
# cross-entropy: the gradient of `cl_optax.online_ewc(2 lambda, decay=0)`.
#  * EWC: a running Fisher of squared MINIBATCH gradients of the cross-entropy
#    (`set_tmp_fisher` every step; every FISHER_UPDATE_AFTER = 10 steps
#    F <- (1 - 0.9) F + 0.9 / 10 * sum of the last squares), never reset between tasks;
#    at a task's end min-max normalised to [0, 1] over the whole network
#    (`normalize_fisher_at_minima`).
#  * MAS: Omega = (1/N) sum over the task's batches of 10 of |d sum_batch ||logits||^2 / d theta|
#    (`create_hebbian_ops`, reset at every task's end: `reset_hebbian_scores`).


def _agem_fisher_init(a: AuxInit):
  z = jax.tree.map(jnp.zeros_like, a.params)
  return {"tmp": z, "running": z}


def _agem_fisher_step(s: Step):
  """The A-GEM code's running Fisher, updated at every training step (before the update)."""
  g = jax.grad(s.loss_fn)(s.params, s.x, s.y, jnp.full(s.y.shape, s.task))
  every, decay = int(s.hp["fisher_every"]), s.hp["fisher_decay"]
  flush = (s.step + 1) % every == 0
  running = jax.tree.map(
    lambda r, t: jnp.where(flush, (1.0 - decay) * r + decay / every * t, r),
    s.aux["running"], s.aux["tmp"],
  )  # fmt: skip
  tmp = jax.tree.map(lambda t, gi: jnp.where(flush, 0.0, t) + gi * gi, s.aux["tmp"], g)
  return {}, {"tmp": tmp, "running": running}


def minmax_normalise(tree: PyTree) -> PyTree:
  """``(F - min F) / (max F - min F + 1e-32)``, min and max over every leaf together."""
  leaves = jax.tree.leaves(tree)
  lo = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  hi = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
  return jax.tree.map(lambda x: (x - lo) / (hi - lo + 1e-32), tree)


def _consolidate_agem_ewc(e: TaskEnd):
  imp = minmax_normalise(e.aux["running"])
  aux = {"tmp": jax.tree.map(jnp.zeros_like, e.aux["tmp"]), "running": e.aux["running"]}
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), aux


@functools.partial(jax.jit, static_argnums=0)
def _agem_mas_sum(fn, params, xs):
  def body(acc, x):
    active = fn(params, x) > -1e8  # inactive head columns (-1e9) do not count

    def sq(p):
      return jnp.sum(jnp.square(jnp.where(active, fn(p, x), 0.0)))

    return jax.tree.map(lambda a, b: a + jnp.abs(b), acc, jax.grad(sq)(params)), None

  acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
  return acc


def agem_code_mas_importance(fn, params, xs) -> PyTree:
  """The A-GEM code's MAS Omega: ``xs`` is ``[n_batches, B, ...]``; mean over the N = n_batches * B
  examples of |gradient of the batch's summed squared logits|."""
  n = xs.shape[0] * xs.shape[1]
  return jax.tree.map(lambda a: a / n, _agem_mas_sum(fn, params, xs))


def _consolidate_agem_mas(e: TaskEnd):
  imp = agem_code_mas_importance(_head_fn(e), e.params, e.batches[0])
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), e.aux


_AGEM_CODE_EWC = {"lr": 0.03, "strength": 2 * 10.0}  # replicate_results_iclr19.sh: EWC lr 0.03, lambda 10
_AGEM_CODE_MAS = {"lr": 0.1, "strength": 2 * 0.1}  # MAS lr 0.1, lambda 0.1
register(
  Method(
    "ewc_agem_code",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], 0.0), h.base()),
    "the A-GEM code's EWC: one anchor, running minibatch Fisher of the last task, min-max normalised",
    end_task=_consolidate_agem_ewc,
    init_aux=_agem_fisher_init,
    step=_agem_fisher_step,
    defaults={"strength": 2 * 10.0, "fisher_every": 10, "fisher_decay": 0.9},
    protocol={"pmnist-agem": _AGEM_CODE_EWC, "pmnist-agem-1k": _AGEM_CODE_EWC},
  )
)
register(
  Method(
    "mas_agem_code",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], 0.0), h.base()),
    "the A-GEM code's MAS: one anchor, Omega of the last task from minibatch output-norm gradients",
    end_task=_consolidate_agem_mas,
    defaults={"strength": 2 * 0.1},
    protocol={"pmnist-agem": _AGEM_CODE_MAS, "pmnist-agem-1k": _AGEM_CODE_MAS},
  )
)
# SI: strength = 2c (the papers' penalty has no 1/2). van de Ven: c 10 / 5e4 / 5e3,
# xi 0.1, gradient of the total loss (include_penalty); A-GEM script: c 0.1, lr 0.1, with
# xi 0.1 (Zenke's xi 1e-3 gave a non-finite training loss on task 2 at lr 0.1, seed 0).
_AGEM_SI = {"lr": 0.1, "strength": 2 * 0.1, "damping": 0.1, "include_penalty": False}
register(
  Method(
    "si",
    lambda h: optax.chain(
      cl_optax.si(h.hp["strength"], h.hp["damping"], include_penalty=h.hp["include_penalty"]),
      h.base(),
    ),
    "SI (Zenke et al. 2017): path integral inside update, consolidate needs no signal",
    end_task=_consolidate_plain,
    defaults={"strength": 2.0, "damping": 0.1, "include_penalty": True},
    protocol={
      "split-mnist/task": {"strength": 2 * 10.0},
      "split-mnist/domain": {"strength": 2 * 5e4},
      "split-mnist/class": {"strength": 2 * 5e3},
      "split-digits/task": {"strength": 2 * 10.0},
      "split-digits/domain": {"strength": 2 * 5e4},
      "split-digits/class": {"strength": 2 * 5e3},
      "split-mnist-2019/task": {"strength": 2 * 50.0},
      "split-mnist-2019/domain": {"strength": 2 * 500.0},
      "split-mnist-2019/class": {"strength": 2 * 0.5},
      "pmnist-agem": _AGEM_SI,
      "pmnist-agem-1k": _AGEM_SI,
    },
  )
)
# data_size N: the examples per task (official: 12000 split MNIST, 60000 permuted MNIST)
_NCL_DEFAULTS = {
  "data_size": 300.0,
  "strength": 1.0,
  "damping": 1e-3,
  "fisher": "exact",
  "fisher_n": 1000,
}
_NCL_PROTOCOL = {
  "split-mnist": {"data_size": 12000.0, "fisher_n": None},
  "pmnist-agem": {"data_size": 55000.0},  # MNIST train[5000:]
  # 1000 where a task has 1000 (60000 there froze the net: 15.5 %)
  "pmnist-agem-1k": {"data_size": 1000.0},
  "pmnist-gem": {"data_size": 1000.0},
  "pmnist-gpm": {"data_size": 54000.0},
}
register(
  Method(
    "ncl",
    lambda h: optax.chain(
      cl_optax.ncl(h.hp["data_size"], h.hp["strength"], h.hp["damping"]), optax.sgd(h.lr)
    ),
    "NCL (Kao et al. 2021), diagonal precision from importance.fisher_diag; plain SGD",
    "sgd",
    end_task=_consolidate_ncl,
    defaults=_NCL_DEFAULTS,
    protocol=_NCL_PROTOCOL,
  )
)
register(
  Method(
    "ncl_kfac",
    lambda h: optax.chain(
      cl_optax.ncl(
        h.hp["data_size"],
        h.hp["strength"],
        h.hp["damping"],
        precision="kfac",
        layers=mlp_layer_names(len(h.hidden) + 1),
      ),
      optax.sgd(h.lr),
    ),
    "NCL with Kronecker-factored precision from importance.kfac_factors (every layer); plain SGD",
    "sgd",
    end_task=_consolidate_ncl_kfac,
    defaults=_NCL_DEFAULTS,
    protocol=_NCL_PROTOCOL,
  )
)


# Projection (OGD, GPM): a basis grown at the end of each task.


def _consolidate_ogd(e: TaskEnd):
  xs, ys = e.batches
  n = e.hp["samples"]
  x = xs.reshape(-1, *xs.shape[2:])[:n]
  y = ys.reshape(-1)[:n]
  grads = cl_optax.output_gradients(_head_fn(e), e.params, x, y)  # ground-truth logit (GTL)
  return cl_optax.consolidate(e.opt_state, e.params, output_grads=grads), e.aux


def _gpm_layers(h: Hyper):
  def labels(params):
    heads = h.is_head(params)
    return jax.tree.map(
      lambda p, hd: jnp.ndim(p) >= 2 and (h.hp["project_head"] or not hd), params, heads
    )

  return labels


def _consolidate_gpm(e: TaskEnd):
  xs, _ = e.batches
  x = xs.reshape(-1, *xs.shape[2:])[: e.hp["samples"]]
  reps = mlp_layer_inputs(e.params, x)
  if not e.hp["project_head"]:
    reps = {k: v for k, v in reps.items() if k != "head"}
  thr = e.hp["thresholds"]  # per layer, in order (the paper's PMNIST: 0.95, 0.99, 0.99)
  gpm_thr = {k: {"kernel": float(thr[min(i, len(thr) - 1)])} for i, k in enumerate(reps)}
  state = cl_optax.consolidate(e.opt_state, e.params, representations=reps, gpm_threshold=gpm_thr)
  return state, e.aux


register(
  Method(
    "ogd",
    lambda h: optax.chain(cl_optax.ogd(h.hp["max_directions"]), h.base()),
    "OGD (Farajtabar et al. 2020): ground-truth-logit gradients of `samples` examples per task",
    end_task=_consolidate_ogd,
    # the basis is max_directions x the model: (tasks - 1) * samples must fit
    defaults={"samples": 200, "max_directions": 800},
    # the demo: 50 per task (the paper's 200 cost ~40 s of Gram-Schmidt per seed on 2 cores)
    protocol={
      "split-digits": {"samples": 50, "max_directions": 200},
      # the paper's 200 per task; every task but the last adds its 200
      "pmnist-agem-1k": {"samples": 200, "max_directions": 16 * 200},
      "pmnist-gem": {"samples": 200, "max_directions": 19 * 200},
      "rmnist-gem": {"samples": 200, "max_directions": 19 * 200},
    },
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
    # single-head permuted streams: GPM's own PMNIST settings (the shared head is projected)
    protocol={
      k: {"thresholds": [0.95, 0.99, 0.99], "project_head": True}
      for k in ("pmnist-gpm", "pmnist-agem", "pmnist-agem-1k", "pmnist-gem", "rmnist-gem")
    },
  )
)


# ----------------------------------------------------------------- presets


class Preset(NamedTuple):
  """A protocol: data, stream, model and optimiser settings."""

  doc: str
  stream: Callable[[argparse.Namespace, int], streams.Stream]  # (args, seed) -> Stream
  hidden: tuple[int, ...]
  optimizer: str
  lr: dict  # per base optimiser
  batch_size: int
  epochs: int | None = 1
  iters: int | None = None  # iterations per task (overrides epochs)
  bias: bool = True
  scenario: str | None = None  # default scenario of split streams
  init: str = "torch"  # parameter init (mlp_init): "torch" or "agem" (the A-GEM code's)


@functools.lru_cache(maxsize=2)
def _mnist(path):
  return streams.load_mnist(path)


def _digits_split(args, seed):
  ds = streams.load_digits()
  return streams.split(
    ds.x_train, ds.y_train, classes_per_task=2, scenario=args.scenario, seed=seed
  )


def _mnist_split(args, seed, shuffle_classes=False):
  ds = _mnist(args.data)
  groups = None
  if shuffle_classes:  # van de Ven's code: a random digit -> task assignment per seed
    perm = np.random.default_rng(seed).permutation(10)
    groups = [tuple(int(c) for c in perm[i : i + 2]) for i in range(0, 10, 2)]
  return streams.split(
    ds.x_train, ds.y_train, classes_per_task=2, groups=groups, scenario=args.scenario,
    test=(ds.x_test, ds.y_test), seed=seed,
  )  # fmt: skip


def _mnist_permuted(n_tasks, n_train, first_identity=False, skip=0):
  def make(args, seed):
    ds = _mnist(args.data)
    return streams.permuted(
      ds.x_train[skip:], ds.y_train[skip:], n_tasks=n_tasks, test=(ds.x_test, ds.y_test), seed=seed,
      first_identity=first_identity, n_train=n_train,
    )  # fmt: skip

  return make


def _mnist_rotated(n_tasks, n_train):
  def make(args, seed):
    ds = _mnist(args.data)
    return streams.rotated(
      ds.x_train, ds.y_train, n_tasks=n_tasks, max_degrees=180.0, test=(ds.x_test, ds.y_test),
      seed=seed, n_train=n_train, interpolation="nearest",
    )  # fmt: skip

  return make


PRESETS: dict[str, Preset] = {
  "split-digits": Preset(
    "scikit-learn digits, 5 tasks x 2 classes, MLP 64-256-256, 10 epochs, batch 32 (offline)",
    _digits_split,
    (256, 256),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    32,
    epochs=10,
    scenario="task",
  ),
  "split-mnist": Preset(
    "van de Ven et al.: split MNIST 5 x 2, MLP 784-400-400, Adam 1e-3, batch 128, 2000 iters/task",
    _mnist_split,
    (400, 400),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    128,
    epochs=None,
    iters=2000,
    scenario="task",
  ),
  "split-mnist-2019": Preset(
    "van de Ven & Tolias 2019 as their 2019 code runs it: split-mnist with the digits assigned to "
    "the 5 tasks at random per seed (data.py, seeds >= 1), methods at the code's Dec. 2019 "
    "per-scenario values (param_values.py)",
    functools.partial(_mnist_split, shuffle_classes=True),
    (400, 400),
    "adam",
    {"sgd": 0.1, "adam": 1e-3},
    128,
    epochs=None,
    iters=2000,
    scenario="task",
  ),
  "pmnist-agem": Preset(
    "A-GEM (Chaudhry et al., ICLR 2019): permuted MNIST, the 17 evaluation tasks, every training "
    "example once (MNIST train[5000:], TF's 55000 split), batch 10, MLP 784-256-256-10, SGD "
    "(VAN lr 0.03)",
    _mnist_permuted(17, None, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-agem-1k": Preset(
    "the A-GEM code's later default (commit 1ef4c10, the ER paper's protocol): as pmnist-agem "
    "but a random 1000 training examples per task",
    _mnist_permuted(17, 1000, skip=5000),
    (256, 256),
    "sgd",
    {"sgd": 0.03, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-gem": Preset(
    "GEM (Lopez-Paz & Ranzato 2017): permuted MNIST, 20 tasks x 1000 examples, 1 epoch, batch 10, "
    "MLP 784-100-100-10, SGD lr 0.1",
    _mnist_permuted(20, 1000),
    (100, 100),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "rmnist-gem": Preset(
    "GEM: rotated MNIST, 20 tasks (angles in [9t, 9t+9) deg), 1000 examples/task, 1 epoch, "
    "batch 10, "
    "MLP 784-100-100-10, SGD lr 0.1",
    _mnist_rotated(20, 1000),
    (100, 100),
    "sgd",
    {"sgd": 0.1, "adam": 1e-3},
    10,
    epochs=1,
  ),
  "pmnist-gpm": Preset(
    "GPM (Saha et al. 2021): permuted MNIST, 10 tasks, 54000 train examples/task (10% held out), "
    "5 epochs, batch 10, MLP 784-100-100-10 without biases, SGD lr 0.01",
    _mnist_permuted(10, 54000),
    (100, 100),
    "sgd",
    {"sgd": 0.01, "adam": 1e-3},
    10,
    epochs=5,
    bias=False,
  ),
}


# ------------------------------------------------------------------ runner

_BAR: list = [None]  # the tqdm bar of the task being trained (updated from the scan)


def _tick(n):
  bar = _BAR[0]
  if bar is not None:
    bar.update(int(n))


class Config(NamedTuple):
  hidden: tuple[int, ...]
  optimizer: str
  lr: dict
  batch_size: int
  epochs: int | None
  iters: int | None
  bias: bool = True
  hp: dict = {}
  progress: bool = True
  ticks: int = 50  # progress updates per task
  protocol: str = ""  # the preset's name (selects Method.protocol settings)
  lr_override: float | None = None  # --lr
  scenario: str = ""  # split streams: "task"/"domain"/"class" (selects "preset/scenario" settings)
  init: str = "torch"  # mlp_init's init (the preset's; --init overrides)


def _batch_indices(rng, n: int, batch: int, epochs: int | None, iters: int | None):
  if n < batch:
    raise ValueError(f"continual: a task has {n} training examples, fewer than a batch ({batch}).")
  per = n // batch  # drops the last partial batch (fixed shapes inside the scan)
  reps = epochs if iters is None else -(-iters // per)
  idx = np.concatenate([rng.permutation(n)[: per * batch] for _ in range(reps)]).reshape(-1, batch)
  return idx if iters is None else idx[:iters]


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def _make_train(method: Method, tx, apply, hp: dict, ticks_every: int, padded: bool):
  """The jitted per-task trainer: one lax.scan over the task's batches."""

  def loss_fn_for(columns, valid):
    def loss_fn(params, x, y, task_ids, weights=None):
      logits = apply(params, x)
      losses = xent(logits, columns[task_ids], valid[task_ids], y)
      if weights is None:
        return losses.mean()
      w = weights.astype(losses.dtype)  # e.g. the `valid` rows of a replay sample
      return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

    return loss_fn

  @jax.jit
  def train(params, opt_state, aux, key, X, Y, idx, active, task, columns, valid):
    loss_fn = loss_fn_for(columns, valid)

    def body(carry, inp):
      params, opt_state, aux, key = carry
      b, act, i = inp
      x, y = X[b], Y[b]
      key, sub = jax.random.split(key)
      tids = jnp.full(y.shape, task)

      def do(c):
        params, opt_state, aux = c
        extra = {}
        if method.step is not None:
          extra, aux = method.step(
            Step(params, x, y, task, i, columns, valid, aux, sub, loss_fn, hp)
          )
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, tids)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, aux, loss

      def skip(c):
        return (*c, jnp.zeros((), jnp.float32))

      if padded:
        params, opt_state, aux, loss = jax.lax.cond(act, do, skip, (params, opt_state, aux))
      else:
        params, opt_state, aux, loss = do((params, opt_state, aux))
      if ticks_every:
        jax.lax.cond(
          (i + 1) % ticks_every == 0,
          lambda: jax.debug.callback(_tick, ticks_every),
          lambda: None,
        )
      return (params, opt_state, aux, key), loss

    steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
    (params, opt_state, aux, key), losses = jax.lax.scan(
      body, (params, opt_state, aux, key), (idx, active, steps)
    )
    return params, opt_state, aux, losses

  return train, loss_fn_for


_LOGITS_FNS: dict = {}


def _logits_fn(columns: np.ndarray, valid: np.ndarray):
  """``logits_fn(params, x, head)`` for the estimators, one object per head layout
  (they jit with it as a static argument, so seeds with the same layout share compiles)."""
  key = (columns.shape, columns.tobytes(), valid.tobytes())
  if key not in _LOGITS_FNS:
    cols, ok = jnp.asarray(columns), jnp.asarray(valid)

    def logits_fn(p, x, head):
      return head_logits(mlp_apply(p, x), cols[head], ok[head])

    _LOGITS_FNS[key] = logits_fn
  return _LOGITS_FNS[key]


def _make_eval(apply):
  @jax.jit
  def correct(params, x, y, w, cols, valid):
    logits = head_logits(apply(params, x), cols, valid)
    return jnp.sum((jnp.argmax(logits, -1) == y) * w), jnp.sum(w)

  return correct


def run_method(
  name: str,
  make_stream: Callable[[int], streams.Stream],
  cfg: Config,
  seeds: list[int],
  *,
  return_state: bool = False,
  on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
  """Trains one method on the stream for each seed; returns one record per seed.

  With ``return_state`` each record also holds ``"final_state"``:
  ``(params, opt_state, aux)`` after the last task (not JSON-serialisable).
  ``on_record`` is called with each record as soon as its seed is done.
  """
  method = METHODS[name]
  opt = method.optimizer or cfg.optimizer
  spec = dict(method.protocol.get(cfg.protocol, {}))
  spec.update(method.protocol.get(f"{cfg.protocol}/{cfg.scenario}", {}))
  lr = spec.pop("lr", cfg.lr[opt])
  lr = cfg.lr_override if cfg.lr_override is not None else lr
  hp = {**method.defaults, **spec}
  hp.update({k: v for k, v in cfg.hp.items() if k in hp})
  hyper = Hyper(opt, lr, hp, is_head, tuple(cfg.hidden))
  tx = method.make(hyper)
  records = []
  trainers, compiled_cache = {}, {}
  evaluate = _make_eval(mlp_apply)
  for seed in seeds:
    t_wall = time.perf_counter()
    stream = make_stream(seed)
    T = len(stream)
    columns, valid = jnp.asarray(stream.columns), jnp.asarray(stream.train_valid)
    eval_valid = np.asarray(stream.eval_valid)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    # Data: every task padded to the same shapes, so the scan compiles once.
    sizes = [t.n_train for t in stream]
    n_max = max(sizes)
    plans = [_batch_indices(rng, n, cfg.batch_size, cfg.epochs, cfg.iters) for n in sizes]
    s_max = max(len(p) for p in plans)
    padded = any(len(p) != s_max for p in plans)
    test_cache = _TestSets(stream)
    x0, _ = stream[0].train()
    d_in = int(np.prod(x0.shape[1:]))
    key, k_init = jax.random.split(key)
    params = mlp_init(k_init, (d_in, *cfg.hidden, stream.n_outputs), bias=cfg.bias, init=cfg.init)
    opt_state = tx.init(params)
    aux = None
    if method.init_aux is not None:
      aux = method.init_aux(AuxInit(params, T, x0.shape[1:], stream.columns, hp))
    ticks_every = max(1, s_max // cfg.ticks) if cfg.progress else 0
    if (padded, ticks_every) not in trainers:
      trainers[padded, ticks_every] = _make_train(method, tx, mlp_apply, hp, ticks_every, padded)
    train_fn, loss_fn_for = trainers[padded, ticks_every]

    logits_fn = _logits_fn(stream.columns, stream.train_valid)

    baseline = test_cache.evaluate(evaluate, params, eval_valid)
    R = np.zeros((T, T))
    train_s = signals_s = compile_s = 0.0
    samples = 0
    for t, task in enumerate(stream):
      x, y = task.train()
      X = jnp.asarray(_pad_rows(x.reshape(len(x), -1).astype(np.float32), n_max))
      Y = jnp.asarray(_pad_rows(y, n_max))
      plan = plans[t]
      active = np.arange(s_max) < len(plan)
      idx = jnp.asarray(_pad_rows(plan.astype(np.int32), s_max))
      key, k_task, k_end = jax.random.split(key, 3)
      args = (params, opt_state, aux, k_task, X, Y, idx, jnp.asarray(active), jnp.int32(t),
              columns, valid)  # fmt: skip
      sig = (
        padded,
        ticks_every,
        str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), args)),
      )
      if sig not in compiled_cache:  # compile once per shape, outside the timed region
        c0 = time.perf_counter()
        compiled_cache[sig] = train_fn.lower(*args).compile()
        compile_s += time.perf_counter() - c0
      compiled = compiled_cache[sig]
      bar = _progress(cfg, name, seed, t, T, len(plan) if not padded else s_max)
      _BAR[0] = bar
      t0 = time.perf_counter()
      params, opt_state, aux, losses = compiled(*args)
      jax.block_until_ready((params, losses))
      jax.effects_barrier()
      train_s += time.perf_counter() - t0
      _BAR[0] = None
      if bar is not None:
        bar.close()
      samples += len(plan) * cfg.batch_size
      if not np.all(np.isfinite(np.asarray(losses)[active])):
        raise FloatingPointError(f"{name}: non-finite training loss on task {t} (seed {seed}).")
      R[t] = test_cache.evaluate(evaluate, params, eval_valid)
      if method.end_task is not None and t < T - 1:
        s0 = time.perf_counter()
        order = _batch_indices(rng, len(x), cfg.batch_size, 1, None)  # one shuffled epoch
        xb, yb = jnp.asarray(x[order].astype(np.float32)), jnp.asarray(y[order])
        end = TaskEnd(t, params, opt_state, aux, (xb, yb), logits_fn, loss_fn_for(columns, valid),
                      stream.columns, stream.train_valid, hp, k_end)  # fmt: skip
        opt_state, aux = method.end_task(end)
        jax.block_until_ready(opt_state)
        signals_s += time.perf_counter() - s0
    wall = time.perf_counter() - t_wall
    summ = metrics.summary(R, baseline)
    records.append(
      {
        "stream": stream.name,
        "scenario": stream.scenario,
        "method": name,
        "seed": seed,
        "optimizer": opt,
        "lr": lr,
        "hp": hp,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "iters": cfg.iters,
        "hidden": list(cfg.hidden),
        "init": cfg.init,
        "n_tasks": T,
        "acc_matrix": R.tolist(),
        "baseline": np.asarray(baseline).tolist(),
        **summ,
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / train_s if train_s > 0 else None,
        "compile_s": compile_s,
        "end_task_s": signals_s,
        "wall_s": wall,
      }
    )
    if on_record is not None:
      on_record(records[-1])
    if return_state:
      records[-1]["final_state"] = (params, opt_state, aux)
  return records


class _TestSets:
  """Padded test sets on device (cached while they fit in 1 GiB; else rebuilt per use)."""

  BUDGET = 2**30

  def __init__(self, stream: streams.Stream):
    self.stream = stream
    self.m = max(t.n_test for t in stream)
    x0, _ = stream[0].test()
    per = self.m * int(np.prod(x0.shape[1:])) * 4
    self.cache = {} if per * len(stream) <= self.BUDGET else None

  def get(self, j):
    if self.cache is not None and j in self.cache:
      return self.cache[j]
    x, y = self.stream[j].test()
    w = _pad_rows(np.ones(len(y), np.float32), self.m)
    out = (
      jnp.asarray(_pad_rows(x.reshape(len(x), -1).astype(np.float32), self.m)),
      jnp.asarray(_pad_rows(y, self.m)),
      jnp.asarray(w),
    )
    if self.cache is not None:
      self.cache[j] = out
    return out

  def evaluate(self, evaluate, params, eval_valid) -> np.ndarray:
    accs = []
    cols = self.stream.columns
    for j in range(len(self.stream)):
      x, y, w = self.get(j)
      c, n = evaluate(params, x, y, w, jnp.asarray(cols[j]), jnp.asarray(eval_valid[j]))
      accs.append(float(c) / float(n))
    return np.asarray(accs)


def _progress(cfg: Config, name, seed, t, T, total):
  if not cfg.progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(
    total=total, desc=f"{name:>10} seed {seed} task {t + 1}/{T}", leave=False, unit="step",
    file=sys.stderr, mininterval=0.2,
  )  # fmt: skip


# ------------------------------------------------------------------ output


def _fmt(values, scale=100.0, prec=2):
  v = np.asarray([x for x in values if x is not None], float) * scale
  if not len(v):
    return "-"
  return f"{v.mean():.{prec}f} ± {v.std():.{prec}f}"


def _by_method(records: list[dict]) -> dict[str, list[dict]]:
  by = {}
  for r in records:
    by.setdefault(r["method"], []).append(r)
  return by


def results_table(records: list[dict]) -> str:
  by = _by_method(records)
  head = (
    f"{'method':<12}{'ACC (%)':>16}{'BWT (%)':>16}{'FWT (%)':>16}{'forgetting (%)':>17}"
    f"{'samples/s':>12}{'wall s':>9}"
  )
  lines = [head, "-" * len(head)]
  for m, rs in by.items():
    sps = np.mean([r["samples_per_s"] for r in rs if r["samples_per_s"]])
    lines.append(
      f"{m:<12}{_fmt([r['acc'] for r in rs]):>16}{_fmt([r.get('bwt') for r in rs]):>16}"
      f"{_fmt([r.get('fwt') for r in rs]):>16}{_fmt([r.get('forgetting') for r in rs]):>17}"
      f"{sps:>12.0f}{np.mean([r['wall_s'] for r in rs]):>9.1f}"
    )
  return "\n".join(lines)


def save_plots(records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  by = _by_method(records)
  paths = []
  for m, rs in by.items():
    R = np.mean([r["acc_matrix"] for r in rs], 0)
    T = len(R)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * T, 0.9 + 0.4 * T))
    im = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    ax.set(
      title=f"{m}: accuracy (%), mean of {len(rs)} seed(s)",
      xlabel="evaluated on task j",
      ylabel="after training task i",
    )
    if T <= 20:
      for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    path = out / f"heatmap_{m.replace('/', '_')}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, rs in by.items():
    curves = 100 * np.asarray([r["acc_curve"] for r in rs])
    x = np.arange(1, curves.shape[1] + 1)
    mean, std = curves.mean(0), curves.std(0)
    ax.plot(x, mean, marker="o", ms=3, label=m)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  ax.set(xlabel="tasks seen", ylabel="average accuracy on tasks seen (%)", title=rs[0]["stream"])
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend()
  path = out / "avg_accuracy.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  paths.append(path)
  return paths


def _parse_hp(items):
  hp = {}
  for item in items or []:
    k, _, v = item.partition("=")
    if not _:
      raise SystemExit(f"--hp expects name=value; got {item!r}")
    try:
      hp[k] = json.loads(v)
    except json.JSONDecodeError:
      hp[k] = v
  return hp


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stream", default="split-digits", choices=sorted(PRESETS))
  parser.add_argument("--scenario", default=None, choices=streams.SCENARIOS,
                      help="scenario of split streams (default: the preset's)")  # fmt: skip
  parser.add_argument("--methods", default=None, help="comma list (default: every registered)")
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
  parser.add_argument("--seed0", type=int, default=0, help="first seed")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--iters", type=int, default=None, help="iterations per task")
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--lr", type=float, default=None, help="override the preset's lr")
  parser.add_argument("--optimizer", default=None, choices=sorted(BASES))
  parser.add_argument("--hp", action="append", help="method hyper-parameter name=value")
  parser.add_argument("--init", default=None, choices=INITS,
                      help="parameter init (default: the preset's; 'agem' = the A-GEM code's)")  # fmt: skip
  parser.add_argument(
    "--data", default=None, help=f"MNIST .npz or folder (default ${streams.ENV_VAR})"
  )
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/continual"))
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--list", action="store_true", help="list methods and streams")
  parser.add_argument(
    "--from-jsonl",
    type=pathlib.Path,
    nargs="+",
    default=None,
    help="no training: print the table and plot these results.jsonl files",
  )
  args = parser.parse_args(argv)

  if args.from_jsonl:
    records = [json.loads(line) for f in args.from_jsonl for line in open(f) if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    print(results_table(records))
    paths = save_plots(records, args.out)
    print("plots:   " + "\n         ".join(str(p) for p in paths))
    return records

  if args.list:
    print("methods:")
    for m in METHODS.values():
      print(f"  {m.name:<12} {m.doc}")
    print("streams:")
    for n, p in PRESETS.items():
      print(f"  {n:<14} {p.doc}")
    return []
  preset = PRESETS[args.stream]
  args.scenario = args.scenario or preset.scenario or "domain"
  names = args.methods.split(",") if args.methods else list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
  lr = dict(preset.lr)
  iters = args.iters if args.iters is not None else (preset.iters if args.epochs is None else None)
  epochs = None if iters is not None else (args.epochs or preset.epochs or 1)
  cfg = Config(
    hidden=preset.hidden,
    optimizer=args.optimizer or preset.optimizer,
    lr=lr,
    batch_size=args.batch_size or preset.batch_size,
    epochs=epochs,
    iters=iters,
    bias=preset.bias,
    hp=_parse_hp(args.hp),
    progress=not args.no_progress,
    protocol=args.stream,
    lr_override=args.lr,
    scenario=args.scenario,
    init=args.init or preset.init,
  )
  seeds = list(range(args.seed0, args.seed0 + args.seeds))
  dev = jax.devices()[0]
  sched = f"{iters} iters" if iters else f"{epochs} epoch(s)"
  print(
    f"{args.stream} ({args.scenario}-incremental where it applies): {preset.doc}\n"
    f"methods {names}, seeds {seeds}, {sched}/task, batch {cfg.batch_size}; JAX {jax.__version__} "
    f"on {dev.platform} ({os.cpu_count()} CPUs visible)",
    flush=True,
  )
  args.out.mkdir(parents=True, exist_ok=True)
  records = []
  jsonl = args.out / "results.jsonl"
  with open(jsonl, "w") as f:
    for name in names:

      def write(r):
        r.update(
          protocol=args.stream,
          device=f"{dev.platform} ({dev.device_kind})",
          machine=platform.machine(),
          jax=jax.__version__,
          command="python -m benchmarks.continual "
          + " ".join(sys.argv[1:] if argv is None else argv),
        )
        f.write(json.dumps(r) + "\n")
        f.flush()

      recs = run_method(name, lambda s: preset.stream(args, s), cfg, seeds, on_record=write)
      records += recs
      print(
        f"  {name}: ACC {_fmt([r['acc'] for r in recs])} %, "
        f"{np.mean([r['samples_per_s'] for r in recs]):.0f} samples/s, "
        f"{np.mean([r['wall_s'] for r in recs]):.1f} s/seed",
        flush=True,
      )
  print("\n" + results_table(records))
  paths = save_plots(records, args.out)
  print(f"\nresults: {jsonl}\nplots:   " + "\n         ".join(str(p) for p in paths))
  return records


if __name__ == "__main__":
  main()
