"""The runner: one method on one stream for a list of seeds -> accuracy matrices.

A seed runs in named steps: :meth:`_Run.prepare` (the stream, its batch plans, the
initial model), :meth:`_Run.resume` (from a ``--resume`` checkpoint),
:meth:`_Run.one_task` (train one task in a jitted scan, evaluate, end the task) and
:meth:`_Run.record`. A method's end-of-task work (importance estimation,
`cl_optax.consolidate`) runs eagerly between tasks.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.continual import progress
from benchmarks.continual.evaluation import TestSets, make_eval
from benchmarks.continual.model import Heads, make_heads
from benchmarks.continual.nnx_models import run_model
from benchmarks.continual.paper_settings import settings
from benchmarks.continual.progress import Ticks
from benchmarks.continual.registry import METHODS, AuxInit, Hyper, TaskEnd
from benchmarks.continual.resilience import TaskCheckpoints, diverged_record, stability_note
from benchmarks.continual.seed_state import TIMES, Seed
from benchmarks.continual.trainer import batch_indices, make_train, pad_rows
from cl_optax import metrics, streams


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
  protocol: str = ""  # the preset's name (selects paper_settings.SETTINGS rows)
  lr_override: float | None = None  # --lr
  scenario: str = ""  # split streams: "task"/"domain"/"class" (selects "preset/scenario" rows)
  init: str = "torch"  # the parameter init (model.mlp_init): the preset's, or --init
  model: Any = "mlp"  # a nnx_models.MODELS name, a model, or an nnx.Module factory
  resume: str | None = None  # --resume DIR: checkpoint every task there, continue from the last
  stop_after: int | None = None  # --stop-after-task K: checkpoint task K and stop (tests)


class _Run:
  """One method's run over seeds: its transform and jitted trainers, built once and shared
  by every seed; ``heads`` maps a column layout to the model's forward passes (``Heads``),
  so the estimators see one function per head (and compile once) for the whole run."""

  def __init__(self, name: str, cfg: Config, heads: dict):
    self.name, self.cfg = name, cfg
    self.method = method = METHODS[name]
    self.opt = method.optimizer or cfg.optimizer
    spec = settings(cfg.protocol, cfg.scenario, name, cfg.hp.get("buffer"))
    lr = spec.pop("lr", cfg.lr[self.opt])
    self.lr = cfg.lr_override if cfg.lr_override is not None else lr
    self.hp = {**method.defaults, **spec}
    self.hp.update({k: v for k, v in cfg.hp.items() if k in self.hp})
    self.model = run_model(method, name, cfg.model, tuple(cfg.hidden), cfg.bias, cfg.init,
                           self.hp)  # fmt: skip
    self.tx = method.make(Hyper(self.opt, self.lr, self.hp, self.model))
    self.ticks = Ticks()
    ev = method.eval_apply
    self.evaluate = make_eval(self.model.apply if ev is None else functools.partial(ev, self.model))
    self.trainers, self.compiled, self.heads = {}, {}, heads
    self.warned = False  # the stability note is printed once per run

  def eval_args(self, params, aux, opt_state=None):
    """What the evaluation reads: the params, or ``(params, aux)`` for a method's
    ``eval_apply``; with a method's ``eval_view``, ``d ->`` that of task ``d``'s view."""
    view = self.method.eval_view
    if view is not None:
      return lambda d: self._args(view(params, opt_state, aux, d), aux)
    return self._args(params, aux)

  def _args(self, params, aux):
    return params if self.method.eval_apply is None else (params, aux)

  def trainer(self, padded: bool, ticks_every: int):
    if (padded, ticks_every) not in self.trainers:
      self.trainers[padded, ticks_every] = make_train(
        self.method, self.tx, hp=self.hp, apply=self.model.apply, ticks_every=ticks_every,
        on_tick=self.ticks, padded=padded, model=self.model,
      )  # fmt: skip
    return self.trainers[padded, ticks_every]

  def heads_for(self, stream: streams.Stream) -> Heads:
    layout = (self.model.name, stream.columns.tobytes(), stream.columns.shape,
              stream.train_valid.tobytes())  # fmt: skip
    if layout not in self.heads:
      self.heads[layout] = make_heads(stream.columns, stream.train_valid, self.model)
    return self.heads[layout]

  def seed(self, seed: int, make_stream: Callable[[int], streams.Stream]) -> tuple[dict, tuple]:
    """Trains every task of the seed's stream; returns the record (None when stopped by
    ``cfg.stop_after``) and the final ``(params, opt_state, aux)``."""
    s = self.prepare(seed, make_stream)
    ckpt = TaskCheckpoints(self.cfg.resume, self.name, seed) if self.cfg.resume else None
    if ckpt is not None:
      self.resume(s, ckpt)
    for t in range(s.start, len(s.stream)):
      if not self.one_task(s, t):
        break  # diverged: recorded as such; the run goes on with the other methods
      if ckpt is not None:
        meta = {"rng": s.rng.bit_generator.state} | {k: getattr(s, k) for k in TIMES}
        ckpt.save(t, s.arrays(), meta)
      if self.cfg.stop_after is not None and t + 1 == self.cfg.stop_after:
        return None, s.final
    return self.record(s), s.final

  def prepare(self, seed: int, make_stream: Callable[[int], streams.Stream]) -> Seed:
    """The seed's stream, its batch plans (every task padded to the same shapes, so the
    scan compiles once), the initial parameters, optimiser state and aux."""
    t_wall = time.perf_counter()
    stream = make_stream(seed)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    sizes = [t.n_train for t in stream]
    plans = [batch_indices(rng, n, self.cfg.batch_size, self.cfg.epochs, self.cfg.iters)
             for n in sizes]  # fmt: skip
    tests = TestSets(stream)
    x0, _ = stream[0].train()
    key, k_init = jax.random.split(key)
    params = self.model.init(k_init, x0.shape[1:], stream.n_outputs)
    opt_state = self.tx.init(params)
    aux = None
    if self.method.init_aux is not None:
      aux = self.method.init_aux(
        AuxInit(len(stream), x0.shape[1:], self.hp, stream.n_outputs, params)
      )
    baseline = tests.evaluate(
      self.evaluate, self.eval_args(params, aux, opt_state), np.asarray(stream.eval_valid)
    )
    s_max = max(len(p) for p in plans)
    padded = any(len(p) != s_max for p in plans)
    return Seed(
      seed, stream, plans, max(sizes), s_max, padded, tests, rng, key, params, opt_state, aux,
      baseline, np.zeros((len(stream), len(stream))), t_wall,
    )  # fmt: skip

  def resume(self, s: Seed, ckpt: TaskCheckpoints) -> None:
    """Continues ``s`` after the last task ``ckpt`` holds (if any)."""
    last = ckpt.latest()
    if last is None:
      return
    arrays, meta = ckpt.restore(last, s.arrays() | {"R": s.R})
    s.params, s.opt_state, s.key = arrays["params"], arrays["opt_state"], arrays["key"]
    s.aux, s.R = arrays.get("aux", s.aux), np.asarray(arrays["R"])
    s.rng.bit_generator.state = meta["rng"]
    for k in TIMES:
      setattr(s, k, meta[k])
    s.start = last + 1

  def one_task(self, s: Seed, t: int) -> bool:
    """Trains task ``t``, evaluates every task, ends task ``t``; False if it diverged."""
    x, y = s.stream[t].train()
    key, k_task, k_end = jax.random.split(s.key, 3)
    s.key = key
    if not self.train_task(s, t, x, y, k_task):
      s.diverged = t
      return False
    if self.method.finish_task is not None:  # before evaluation: e.g. GDumb's retrain
      k_task, k_finish = jax.random.split(k_task)
      flat = jnp.asarray(x.reshape(len(x), -1).astype(np.float32))[None]
      end = TaskEnd(t, s.params, s.opt_state, s.aux, (flat, jnp.asarray(y)[None]),
                    self.heads_for(s.stream), self.hp, k_finish, self.model,
                    functools.partial(self.retrain, s, t, x, y, jax.random.fold_in(k_finish, 1)),
                    len(s.stream))  # fmt: skip
      s0, trained = time.perf_counter(), s.train_s
      s.params, s.opt_state, s.aux = self.method.finish_task(end)
      s.end_s += time.perf_counter() - s0 - (s.train_s - trained)  # a retrain counts as training
    s.R[t] = s.tests.evaluate(self.evaluate, self.eval_args(s.params, s.aux, s.opt_state),
                              np.asarray(s.stream.eval_valid))  # fmt: skip
    if self.method.end_task is not None and t < len(s.stream) - 1:
      self.end_task(s, t, x, y, k_end)
    return True

  def retrain(self, s: Seed, t: int, x, y, key, params, opt_state, aux, epochs: int):
    """``TaskEnd.retrain``: ``epochs`` more epochs of the jitted step on task ``t``."""
    s.params, s.opt_state, s.aux = params, opt_state, aux
    plan = batch_indices(s.rng, len(x), self.cfg.batch_size, int(epochs), None)
    if not self.train_task(s, t, x, y, key, plan):
      raise FloatingPointError(f"{self.name}: a loss was not finite while retraining task {t}.")
    return s.params, s.opt_state, s.aux

  def train_task(self, s: Seed, t: int, x, y, key, plan=None) -> bool:
    """One jitted scan over task ``t``'s plan (or ``plan``, e.g. a retrain's; compiled once
    per shape, untimed); False if a loss was not finite."""
    cfg = self.cfg
    padded, steps = (s.padded, s.s_max) if plan is None else (False, len(plan))
    plan = s.plans[t] if plan is None else plan
    active = np.arange(steps) < len(plan)
    columns, valid = jnp.asarray(s.stream.columns), jnp.asarray(s.stream.train_valid)
    X = jnp.asarray(pad_rows(x.reshape(len(x), -1).astype(np.float32), s.n_max))
    Y = jnp.asarray(pad_rows(y, s.n_max))
    idx = jnp.asarray(pad_rows(plan.astype(np.int32), steps))
    args = (s.params, s.opt_state, s.aux, key, X, Y, idx, jnp.asarray(active), jnp.int32(t),
            columns, valid, jnp.int32(len(x) // cfg.batch_size))  # fmt: skip
    ticks_every = max(1, steps // cfg.ticks) if cfg.progress and progress.on_terminal() else 0
    shapes = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), args)
    sig = (padded, ticks_every, str(shapes))
    if sig not in self.compiled:
      c0 = time.perf_counter()
      self.compiled[sig] = self.trainer(padded, ticks_every).lower(*args).compile()
      s.compile_s += time.perf_counter() - c0
    desc = f"{self.name:>10} seed {s.seed} task {t + 1}/{len(s.stream)}"
    self.ticks.open(cfg.progress, desc, steps)
    t0 = time.perf_counter()
    s.params, s.opt_state, s.aux, losses = self.compiled[sig](*args)
    jax.block_until_ready((s.params, losses))
    jax.effects_barrier()
    s.train_s += time.perf_counter() - t0
    self.ticks.close()
    s.samples += len(plan) * cfg.batch_size
    return bool(np.all(np.isfinite(np.asarray(losses)[active])))

  def end_task(self, s: Seed, t: int, x, y, key) -> None:
    """The method's end of task ``t`` on one shuffled epoch of its data; notes (once per
    run) a state that makes the next tasks' steps unstable."""
    s0 = time.perf_counter()
    order = batch_indices(s.rng, len(x), self.cfg.batch_size, 1, None)
    xb, yb = jnp.asarray(x[order].astype(np.float32)), jnp.asarray(y[order])
    heads = self.heads_for(s.stream)
    end = TaskEnd(t, s.params, s.opt_state, s.aux, (xb, yb), heads, self.hp, key, self.model,
                  functools.partial(self.retrain, s, t, x, y, jax.random.fold_in(key, 1)),
                  len(s.stream), s.stream[t + 1])  # fmt: skip
    s.opt_state, s.aux = self.method.end_task(end)
    jax.block_until_ready(s.opt_state)
    s.end_s += time.perf_counter() - s0
    s.note = stability_note(s.opt_state, self.opt, self.lr, self.hp, t + 1, len(s.stream))
    if s.note and not self.warned:
      self.warned = True
      print(f"warning: {self.name} after task {t}: {s.note}", file=sys.stderr, flush=True)

  def record(self, s: Seed) -> dict:
    """The seed's JSON record: settings, accuracy matrix, metrics and timings."""
    cfg, T = self.cfg, len(s.stream)
    record = {
      "stream": s.stream.name, "scenario": s.stream.scenario, "method": self.name,
      "seed": s.seed, "optimizer": self.opt, "lr": self.lr, "hp": self.hp,
      "batch_size": cfg.batch_size, "epochs": cfg.epochs, "iters": cfg.iters,
      "hidden": list(cfg.hidden), "init": cfg.init, "n_tasks": T,
      "model": getattr(self.model, "name", "mlp"),
      "acc_matrix": s.R.tolist(), "baseline": np.asarray(s.baseline).tolist(),
      **metrics.summary(s.R, s.baseline),
      "samples": s.samples, "train_s": s.train_s,
      "samples_per_s": s.samples / s.train_s if s.train_s > 0 else None,
      "compile_s": s.compile_s, "end_task_s": s.end_s,
      "wall_s": time.perf_counter() - s.t_wall,
    }  # fmt: skip
    if self.method.capacity is not None:  # the share of the network each task owns
      used = self.method.capacity(s.params, s.opt_state, s.aux, T)
      record["capacity"] = [float(c) for c in used]
    if s.stream.scenario == "class":  # no class of task j is predicted before task j trains:
      record["fwt"] = None  # R[j-1, j] = 0 for every method, FWT only -mean(b_j); undefined
    if s.diverged is not None:
      record = diverged_record(record, s.diverged, s.seed, s.note)
    return record


def run_method(
  name: str,
  make_stream: Callable[[int], streams.Stream],
  cfg: Config,
  seeds: list[int],
  *,
  return_state: bool = False,
  on_record: Callable[[dict], None] | None = None,
  heads: dict | None = None,
) -> list[dict]:
  """Trains one method on the stream for each seed; returns one record per seed.

  With ``return_state`` each record also holds ``"final_state"``:
  ``(params, opt_state, aux)`` after the last task (not JSON-serialisable).
  ``on_record`` is called with each record as soon as its seed is done. ``heads``: a
  dict to share the model's per-layout forward passes (and so the estimators'
  compiles) between calls, e.g. the methods of one CLI run; it is filled as needed.
  """
  run = _Run(name, cfg, {} if heads is None else heads)
  records = []
  for seed in seeds:
    record, state = run.seed(seed, make_stream)
    if record is None:  # stopped after cfg.stop_after tasks (its checkpoint is saved)
      continue
    records.append(record)
    if on_record is not None:
      on_record(record)
    if return_state:
      record["final_state"] = state
  return records
