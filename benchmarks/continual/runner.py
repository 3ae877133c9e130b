"""The runner: one method on one stream for a list of seeds -> accuracy matrices.

Each task trains in ONE jitted `lax.scan` over its batches (the optimiser, the
method's per-step side inputs and the progress ticks all run inside it); a
method's end-of-task work (importance estimation, `cl_optax.consolidate`) runs
eagerly between tasks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.continual import progress
from benchmarks.continual.model import MLP, Heads, head_logits, make_heads, mlp_apply, xent
from benchmarks.continual.nnx_models import make_model
from benchmarks.continual.progress import Ticks
from benchmarks.continual.protocols import settings
from benchmarks.continual.registry import METHODS, AuxInit, Hyper, Method, Step, TaskEnd
from benchmarks.continual.resilience import TaskCheckpoints, diverged_record, stability_note
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
  protocol: str = ""  # the preset's name (selects protocols.SETTINGS rows)
  lr_override: float | None = None  # --lr
  scenario: str = ""  # split streams: "task"/"domain"/"class" (selects "preset/scenario" rows)
  init: str = "torch"  # the parameter init (model.mlp_init): the preset's, or --init
  model: Any = "mlp"  # a nnx_models.MODELS name, a model, or an nnx.Module factory
  resume: str | None = None  # --resume DIR: checkpoint every task there, continue from the last
  stop_after: int | None = None  # --stop-after-task K: checkpoint task K and stop (tests)


def batch_indices(rng, n: int, batch: int, epochs: int | None, iters: int | None):
  """Shuffled example indices ``[steps, batch]`` (each epoch drops its last partial batch)."""
  if n < batch:
    raise ValueError(f"continual: a task has {n} training examples, fewer than a batch ({batch}).")
  per = n // batch  # fixed shapes inside the scan
  reps = epochs if iters is None else -(-iters // per)
  idx = np.concatenate([rng.permutation(n)[: per * batch] for _ in range(reps)]).reshape(-1, batch)
  return idx if iters is None else idx[:iters]


def pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  if len(a) == n:
    return a
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


def active_columns(columns, valid, task_ids, task):
  """Which of each example's head columns are active while training ``task``.

  An example of task ``j`` reads its own head, ``columns[j]``; a column is active if
  it was while training task ``j`` or is one of the current task's active output
  units. Task-IL: task ``j``'s own columns. Class-IL (one shared head): every class
  seen so far, so a replayed example competes with the new classes (over
  ``valid[j]`` alone it would only keep its old decisions and let every new class
  take it).
  """
  now = valid[task][None, :] & (columns[task_ids] == columns[task][None, :])
  return valid[task_ids] | now


def task_loss(apply: Callable, columns, valid, task) -> Callable:
  """``loss_fn(params, x, y, task_ids, weights=None)``: the mean cross-entropy where each
  example reads its own task's columns active now (:func:`active_columns`) while
  training ``task``; with ``weights`` the weighted mean."""

  def loss_fn(params, x, y, task_ids, weights=None):
    ok = active_columns(columns, valid, task_ids, task)
    losses = xent(apply(params, x), columns[task_ids], ok, y)
    if weights is None:
      return losses.mean()
    w = weights.astype(losses.dtype)  # e.g. the `valid` rows of a replay sample
    return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

  return loss_fn


def make_train(
  method: Method,
  tx: optax.GradientTransformation,
  *,
  hp: dict | None = None,
  apply: Callable = mlp_apply,
  ticks_every: int = 0,
  on_tick: Callable[[int], None] | None = None,
  padded: bool = False,
) -> Callable:
  """The jitted per-task trainer: one ``lax.scan`` over the task's batches.

  ``train(params, opt_state, aux, key, X, Y, idx, active, task, columns, valid)
  -> (params, opt_state, aux, losses)``: step ``i`` trains on ``X[idx[i]], Y[idx[i]]``;
  with ``padded`` the steps where ``active`` is False are skipped (a ``lax.cond``).
  ``on_tick(ticks_every)`` is called from inside the scan every ``ticks_every`` steps.
  """
  hp = {} if hp is None else hp
  tick = on_tick if ticks_every and on_tick is not None else None

  @jax.jit
  def train(params, opt_state, aux, key, X, Y, idx, active, task, columns, valid):
    loss_fn = task_loss(apply, columns, valid, task)

    def body(carry, inp):
      params, opt_state, aux, key = carry
      b, act, i = inp
      x, y = X[b], Y[b]
      key, sub = jax.random.split(key)
      tids = jnp.full(y.shape, task)

      def do(c):
        params, opt_state, aux = c
        s = Step(params, x, y, task, columns.shape[0], aux, sub, loss_fn, hp, apply, columns,
                 valid)  # fmt: skip
        extra = {}
        if method.step is not None:
          extra, aux = method.step(s)

        def total(p):
          loss = loss_fn(p, x, y, tids)
          return loss if method.loss is None else loss + method.loss(s, p)

        loss, grads = jax.value_and_grad(total)(params)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, aux, loss

      def skip(c):
        return (*c, jnp.zeros((), jnp.float32))

      if padded:
        params, opt_state, aux, loss = jax.lax.cond(act, do, skip, (params, opt_state, aux))
      else:
        params, opt_state, aux, loss = do((params, opt_state, aux))
      if tick is not None:
        jax.lax.cond(
          (i + 1) % ticks_every == 0,
          lambda: jax.debug.callback(tick, ticks_every),
          lambda: None,
        )
      return (params, opt_state, aux, key), loss

    steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
    (params, opt_state, aux, key), losses = jax.lax.scan(
      body, (params, opt_state, aux, key), (idx, active, steps)
    )
    return params, opt_state, aux, losses

  return train


def make_eval(apply: Callable = mlp_apply) -> Callable:
  """Jitted ``correct(params, x, y, w, cols, valid) -> (weighted hits, total weight)``."""

  @jax.jit
  def correct(params, x, y, w, cols, valid):
    logits = head_logits(apply(params, x), cols, valid)
    return jnp.sum((jnp.argmax(logits, -1) == y) * w), jnp.sum(w)

  return correct


class TestSets:
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
    w = pad_rows(np.ones(len(y), np.float32), self.m)
    out = (
      jnp.asarray(pad_rows(x.reshape(len(x), -1).astype(np.float32), self.m)),
      jnp.asarray(pad_rows(y, self.m)),
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
    self.model = make_model(cfg.model, tuple(cfg.hidden), cfg.bias)
    if cfg.init != "torch":  # --init agem: the A-GEM code's init, for the MLP
      if not isinstance(self.model, MLP):
        raise ValueError(f"--init {cfg.init}: only the MLP model has that init.")
      self.model = self.model._replace(scheme=cfg.init)
    self.tx = method.make(Hyper(self.opt, self.lr, self.hp, self.model))
    self.ticks = Ticks()
    self.evaluate = make_eval(self.model.apply)
    self.trainers, self.compiled, self.heads = {}, {}, heads
    self.warned = False  # the stability note is printed once per run

  def trainer(self, padded: bool, ticks_every: int):
    if (padded, ticks_every) not in self.trainers:
      self.trainers[padded, ticks_every] = make_train(
        self.method, self.tx, hp=self.hp, apply=self.model.apply, ticks_every=ticks_every,
        on_tick=self.ticks, padded=padded,
      )  # fmt: skip
    return self.trainers[padded, ticks_every]

  def heads_for(self, stream: streams.Stream) -> Heads:
    layout = (self.model.name, stream.columns.tobytes(), stream.columns.shape,
              stream.train_valid.tobytes())  # fmt: skip
    if layout not in self.heads:
      self.heads[layout] = make_heads(stream.columns, stream.train_valid, self.model)
    return self.heads[layout]

  def seed(self, seed: int, make_stream: Callable[[int], streams.Stream]) -> tuple[dict, tuple]:
    """Trains every task of the seed's stream; returns the record and the final
    ``(params, opt_state, aux)``."""
    cfg, method, name = self.cfg, self.method, self.name
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
    plans = [batch_indices(rng, n, cfg.batch_size, cfg.epochs, cfg.iters) for n in sizes]
    s_max = max(len(p) for p in plans)
    padded = any(len(p) != s_max for p in plans)
    tests = TestSets(stream)
    x0, _ = stream[0].train()
    key, k_init = jax.random.split(key)
    params = self.model.init(k_init, x0.shape[1:], stream.n_outputs)
    opt_state = self.tx.init(params)
    aux = None
    if method.init_aux is not None:
      aux = method.init_aux(AuxInit(T, x0.shape[1:], self.hp, stream.n_outputs, params))
    ticks_every = max(1, s_max // cfg.ticks) if cfg.progress and progress.on_terminal() else 0
    train = self.trainer(padded, ticks_every)
    heads = self.heads_for(stream)

    baseline = tests.evaluate(self.evaluate, params, eval_valid)
    R = np.zeros((T, T))
    train_s = end_s = compile_s = 0.0
    samples, start, diverged, note = 0, 0, None, None
    ckpt = TaskCheckpoints(cfg.resume, name, seed) if cfg.resume else None
    if ckpt is not None and ckpt.latest() is not None:
      last = ckpt.latest()
      target = {"params": params, "opt_state": opt_state, "key": key, "R": R}
      arrays, meta = ckpt.restore(last, target | ({"aux": aux} if aux is not None else {}))
      params, opt_state, key = arrays["params"], arrays["opt_state"], arrays["key"]
      aux, R = arrays.get("aux", aux), np.asarray(arrays["R"])
      rng.bit_generator.state = meta["rng"]
      samples, train_s, end_s, compile_s = (
        meta[k] for k in ("samples", "train_s", "end_s", "compile_s")
      )
      start = last + 1
    for t, task in enumerate(stream):
      if t < start:
        continue
      x, y = task.train()
      X = jnp.asarray(pad_rows(x.reshape(len(x), -1).astype(np.float32), n_max))
      Y = jnp.asarray(pad_rows(y, n_max))
      plan = plans[t]
      active = np.arange(s_max) < len(plan)
      idx = jnp.asarray(pad_rows(plan.astype(np.int32), s_max))
      key, k_task, k_end = jax.random.split(key, 3)
      args = (params, opt_state, aux, k_task, X, Y, idx, jnp.asarray(active), jnp.int32(t),
              columns, valid)  # fmt: skip
      shapes = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), args)
      sig = (padded, ticks_every, str(shapes))
      if sig not in self.compiled:  # compile once per shape, outside the timed region
        c0 = time.perf_counter()
        self.compiled[sig] = train.lower(*args).compile()
        compile_s += time.perf_counter() - c0
      desc = f"{name:>10} seed {seed} task {t + 1}/{T}"
      self.ticks.open(cfg.progress, desc, len(plan) if not padded else s_max)
      t0 = time.perf_counter()
      params, opt_state, aux, losses = self.compiled[sig](*args)
      jax.block_until_ready((params, losses))
      jax.effects_barrier()
      train_s += time.perf_counter() - t0
      self.ticks.close()
      samples += len(plan) * cfg.batch_size
      if not np.all(np.isfinite(np.asarray(losses)[active])):
        diverged = t  # recorded as such; the run goes on with the other methods
        break
      R[t] = tests.evaluate(self.evaluate, params, eval_valid)
      if method.end_task is not None and t < T - 1:
        s0 = time.perf_counter()
        order = batch_indices(rng, len(x), cfg.batch_size, 1, None)  # one shuffled epoch
        xb, yb = jnp.asarray(x[order].astype(np.float32)), jnp.asarray(y[order])
        end = TaskEnd(t, params, opt_state, aux, (xb, yb), heads, self.hp, k_end)
        opt_state, aux = method.end_task(end)
        jax.block_until_ready(opt_state)
        end_s += time.perf_counter() - s0
        note = stability_note(opt_state, self.opt, self.lr, self.hp, t + 1, T)
        if note and not self.warned:
          self.warned = True
          print(f"warning: {name} after task {t}: {note}", file=sys.stderr, flush=True)
      if ckpt is not None:
        arrays = {"params": params, "opt_state": opt_state, "key": key, "R": jnp.asarray(R)}
        meta = {"rng": rng.bit_generator.state, "samples": samples, "train_s": train_s,
                "end_s": end_s, "compile_s": compile_s}  # fmt: skip
        ckpt.save(t, arrays | ({"aux": aux} if aux is not None else {}), meta)
      if cfg.stop_after is not None and t + 1 == cfg.stop_after:
        return None, (params, opt_state, aux)
    record = {
      "stream": stream.name, "scenario": stream.scenario, "method": name, "seed": seed,
      "optimizer": self.opt, "lr": self.lr, "hp": self.hp, "batch_size": cfg.batch_size,
      "epochs": cfg.epochs, "iters": cfg.iters, "hidden": list(cfg.hidden), "init": cfg.init,
      "n_tasks": T, "model": getattr(self.model, "name", "mlp"),
      "acc_matrix": R.tolist(), "baseline": np.asarray(baseline).tolist(),
      **metrics.summary(R, baseline),
      "samples": samples, "train_s": train_s,
      "samples_per_s": samples / train_s if train_s > 0 else None,
      "compile_s": compile_s, "end_task_s": end_s, "wall_s": time.perf_counter() - t_wall,
    }  # fmt: skip
    if diverged is not None:
      record = diverged_record(record, diverged, seed, note)
    return record, (params, opt_state, aux)


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
