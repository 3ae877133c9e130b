"""The training program of tests/test_restart.py, and its restore half (run as a script).

Every case trains a small MLP over three tasks of ``STEPS`` steps, calling
``cl_optax.consolidate`` after the first two. ``checkpoint`` stops halfway
through the third task and saves, with orbax, everything the run needs to go
on: params, optimiser state, replay memory, PRNG key and step.

  python tests/restart_program.py DIR

restores every case's run from ``DIR/ckpt`` in this new process, finishes
them and saves their final params and optimiser states to ``DIR/final``
(one checkpoint for all the cases: orbax's per-save overhead dominates here).
"""

from __future__ import annotations

import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

import cl_optax

STEPS, TASKS, BATCH = 4, 3, 8
HALF = 2 * STEPS + STEPS // 2  # the checkpoint: after two tasks and half of the third
LAYERS = ("dense", "head")
UNITS = ("dense/kernel", "dense/bias", "head/kernel", "head/bias")  # CBP / ReDo layer spec


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
    "dense": {"kernel": 0.5 * jax.random.normal(k1, (6, 5)), "bias": jnp.zeros(5)},
    "head": {"kernel": 0.5 * jax.random.normal(k2, (5, 3)), "bias": jnp.zeros(3)},
  }


def lora_params():
  """``init_params`` with a LoRA branch (cl_optax.adapters' layout, 3 slots) on ``dense``."""
  params = init_params()
  params["dense"] |= cl_optax.adapters.lora_init(jax.random.key(3), 6, 5, rank=2, slots=TASKS)
  return params


def apply(params, x, taps=None):
  """``(logits, inputs of each dense layer)``; ``taps`` (K-FAC) add to the layer outputs."""
  taps = taps or {"dense": 0.0, "head": 0.0}
  pre = x @ params["dense"]["kernel"] + params["dense"]["bias"] + taps["dense"]
  if "lora_a" in params["dense"]:
    pre = pre + cl_optax.adapters.lora_apply(params["dense"], x, 2.0)
  h = jnp.tanh(pre)
  logits = h @ params["head"]["kernel"] + params["head"]["bias"] + taps["head"]
  return logits, {"dense": x, "head": h}


def loss_fn(params, x, y, weights=None):
  per = optax.softmax_cross_entropy_with_integer_labels(apply(params, x)[0], y)
  if weights is None:
    return per.mean()
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batch(step: int):
  """The batch of a step: inputs from the step, labels from the task's own linear map."""
  x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (BATCH, 6))
  w = jax.random.normal(jax.random.fold_in(jax.random.key(2), step // STEPS), (6, 3))
  return x, jnp.argmax(x @ w, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------- signals
def _grads(params, task):
  x, y = batch(task * STEPS)
  return jax.grad(loss_fn)(params, x, y)


def unit_importance(params, task):
  return {
    "importance": jax.tree.map(
      lambda g: jnp.tanh(jnp.abs(g) / (jnp.std(g) + 1e-12)), _grads(params, task)
    )
  }


def squared(name):
  return lambda params, task: {name: jax.tree.map(jnp.square, _grads(params, task))}


def kfac(params, task):
  x, y = batch(task * STEPS)
  factors = cl_optax.importance.kfac_factors(
    apply,
    params,
    cl_optax.importance.Batches(x[None], y[None]),
    layers=LAYERS,
    key=jax.random.key(task),
  )
  return {"precision": factors}


def representations(params, task):
  _, inputs = apply(params, batch(task * STEPS)[0])
  return {"representations": {k: {"kernel": v} for k, v in inputs.items()}}


def output_grads(params, task):
  x, y = batch(task * STEPS)
  fn = lambda p, x: apply(p, x)[0]  # noqa: E731
  return {"output_grads": cl_optax.importance.output_gradients(fn, params, x[:3], y[:3])}


def hat_gates(params, task):
  """HAT's task gates: a different half of the units for each task."""
  return {"gates": [jax.nn.sigmoid(40.0 * jnp.sin(jnp.arange(n) + task)) for n in (5, 3)]}


def no_signals(params, task):
  return {}


def fresh(params, task):
  """A fresh draw of the network (shrink and perturb's ``fresh=``)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + task), len(leaves))
  draws = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return {"fresh": jax.tree.unflatten(treedef, draws)}


def covariances(params, task):
  c = {"dense": cl_optax.adapters.input_covariance(batch(task * STEPS)[0])}
  nxt = {"dense": cl_optax.adapters.input_covariance(batch((task + 1) * STEPS)[0])}
  return {"covariance": c, "next_covariance": nxt}


class Case(NamedTuple):
  make: object  # () -> GradientTransformation
  signals: object  # (params, task) -> consolidate signals; None: no consolidate (no boundary)
  memory: str | None = None  # "reservoir" (agem), "ring" (gem) or "cbrs" (class-balanced)
  activations: bool = False  # update(..., activations=[hidden]) (unit resets)
  params: object = init_params  # () -> the initial params


def _sgd(tx):
  return lambda: optax.chain(tx(), optax.sgd(0.1))


def _adam(tx):
  return lambda: optax.chain(optax.adam(1e-2), tx())


CASES = {
  "soft_mask": Case(_adam(cl_optax.soft_mask), unit_importance),
  "freeze": Case(_adam(cl_optax.freeze), unit_importance),
  "agem": Case(_sgd(cl_optax.agem), no_signals, "reservoir"),
  "gem": Case(_sgd(lambda: cl_optax.gem(max_tasks=TASKS)), no_signals, "ring"),
  "ogd": Case(_sgd(lambda: cl_optax.ogd(8)), output_grads),
  "gpm": Case(_sgd(lambda: cl_optax.gpm(0.9)), representations),
  "sgp": Case(_sgd(lambda: cl_optax.sgp(0.9)), representations),
  "nscl": Case(_adam(lambda: cl_optax.nscl(10.0)), representations),
  "trgp": Case(_sgd(lambda: cl_optax.trgp(0.9, max_tasks=TASKS)), representations),
  "ncl_diag": Case(
    _sgd(lambda: cl_optax.ncl(16.0, strength=0.5, damping=0.1)), squared("precision")
  ),
  "ncl_kfac": Case(
    _sgd(lambda: cl_optax.ncl(16.0, strength=0.5, damping=0.1, precision="kfac", layers=LAYERS)),
    kfac,
  ),
  "ewc": Case(_sgd(lambda: cl_optax.ewc(3.0)), squared("importance")),
  "online_ewc": Case(_sgd(lambda: cl_optax.online_ewc(3.0, decay=0.9)), squared("importance")),
  "mas": Case(_sgd(lambda: cl_optax.mas(3.0)), squared("importance")),
  "si": Case(_sgd(lambda: cl_optax.si(3.0)), no_signals),
  "hat": Case(_adam(lambda: cl_optax.hat(LAYERS)), hat_gates),
  "packnet": Case(
    lambda: optax.chain(optax.adam(1e-2), cl_optax.packnet(layers="dense")),
    lambda params, task: {"prune": 0.5, "finish": True},
  ),
  "experience_replay(cbrs)": Case(_sgd(cl_optax.experience_replay), no_signals, "cbrs"),
  "rwalk": Case(_sgd(lambda: cl_optax.rwalk(3.0, every=2)), no_signals),
  # plasticity: PRNG keys, step counters, unit utilities and ages restored exactly
  "l2_init": Case(_sgd(lambda: cl_optax.l2_init(0.1)), no_signals),
  "param_noise": Case(lambda: optax.chain(optax.sgd(0.1), cl_optax.param_noise(0.01)), no_signals),
  "shrink_perturb": Case(lambda: cl_optax.shrink_perturb(inner=optax.adam(1e-2)), fresh),
  "continual_backprop": Case(
    lambda: cl_optax.continual_backprop(
      optax.adam(1e-2), layers=[UNITS], replacement_rate=0.3, maturity_threshold=2
    ),
    None,
    activations=True,
  ),
  "redo": Case(
    lambda: cl_optax.redo(optax.adam(1e-2), layers=[UNITS[:3]], threshold=0.9, every=3),
    None,
    activations=True,
  ),
  "inject_hyperparams(ewc)": Case(
    _sgd(lambda: optax.inject_hyperparams(cl_optax.ewc)(strength=3.0)), squared("importance")
  ),
  "olora": Case(lambda: cl_optax.olora(optax.adam(1e-2), 0.5), no_signals, params=lora_params),
  "inflora": Case(
    lambda: cl_optax.inflora(optax.sgd(0.1), 0.9, 1.0), covariances, params=lora_params
  ),
  "MultiSteps(soft_mask)": Case(
    lambda: optax.MultiSteps(
      optax.chain(optax.adam(1e-2), cl_optax.soft_mask()), every_k_schedule=2
    ).gradient_transformation(),
    unit_importance,
  ),
}


# ------------------------------------------------------------------ training
def init_run(name: str) -> dict:
  """Everything a run carries: params, opt state, memory, PRNG key, step."""
  case = CASES[name]
  params = case.params()
  run = {"params": params, "opt_state": case.make().init(params)}
  item = (jnp.zeros(6), jnp.zeros((), jnp.int32))
  if case.memory == "reservoir":
    run["memory"] = cl_optax.replay.init(item, 16)
  elif case.memory == "ring":
    run["memory"] = cl_optax.replay.init(item, 4, num_tasks=TASKS)
  elif case.memory == "cbrs":
    run["memory"] = cl_optax.replay.init_balanced(item, 12, 3)
  run["key"] = jax.random.key(7)
  run["step"] = jnp.asarray(0, jnp.int32)
  return run


_STEP_FNS: dict = {}


def _step_fn(name: str):
  """One jitted step per case, shared by every run of the case in this process."""
  if name in _STEP_FNS:
    return _STEP_FNS[name]
  case = CASES[name]
  tx = case.make()

  def step(params, opt_state, memory, key, x, y, task):
    grads = jax.grad(loss_fn)(params, x, y)
    extra = {}
    if case.memory == "reservoir":
      (mx, my), valid = cl_optax.replay.sample(memory, key, BATCH)
      extra["ref_grads"] = jax.grad(loss_fn)(params, mx, my, valid.astype(jnp.float32))
      memory = cl_optax.replay.add(memory, (x, y), key=jax.random.fold_in(key, 1))
    elif case.memory == "ring":
      full = cl_optax.replay.filled(memory).astype(jnp.float32)
      mx, my = memory.items
      extra["task_grads"] = jax.vmap(jax.grad(loss_fn), (None, 0, 0, 0))(params, mx, my, full)
      extra["task_mask"] = jnp.arange(TASKS) < task
      memory = cl_optax.replay.add(memory, (x, y), task=task)
    elif case.memory == "cbrs":  # class-balanced reservoir, class-balanced draws
      memory = cl_optax.replay.add_balanced(memory, (x, y), y, key=key, rule="cbrs")
      (mx, my), valid = cl_optax.replay.sample(memory, jax.random.fold_in(key, 2), 4, balanced=True)
      extra["replay_grads"] = jax.grad(loss_fn)(params, mx, my, valid.astype(jnp.float32))
    if case.activations:
      extra["activations"] = [apply(params, x)[1]["head"]]
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, memory

  _STEP_FNS[name] = (tx, jax.jit(step))
  return _STEP_FNS[name]


def train(name: str, run: dict, stop: int) -> dict:
  """Continues ``run`` from its ``step`` to ``stop``, consolidating at task ends."""
  tx, step = _step_fn(name)
  run = dict(run)
  for s in range(int(run["step"]), stop):
    task = s // STEPS
    x, y = batch(s)
    key = jax.random.fold_in(run["key"], s)
    run["params"], run["opt_state"], memory = step(
      run["params"], run["opt_state"], run.get("memory"), key, x, y, task
    )
    if memory is not None:
      run["memory"] = memory
    if (s + 1) % STEPS == 0 and task + 1 < TASKS and CASES[name].signals is not None:
      signals = CASES[name].signals(run["params"], task)
      run["opt_state"] = cl_optax.consolidate(run["opt_state"], run["params"], **signals)
    run["step"] = jnp.asarray(s + 1, jnp.int32)
  return run


# --------------------------------------------------------------- checkpoints
def _to_disk(run: dict) -> dict:  # orbax stores a typed PRNG key as its raw data
  return dict(run, key=jax.random.key_data(run["key"])) if "key" in run else run


def _from_disk(run: dict) -> dict:
  return dict(run, key=jax.random.wrap_key_data(run["key"])) if "key" in run else run


def save(path: pathlib.Path, tree) -> None:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path.absolute(), tree)


def restore(path: pathlib.Path, target):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path.absolute(), target=target)


def key(name: str) -> str:
  """The case's key in a checkpoint (letters, digits and ``_`` only)."""
  return "".join(c if c.isalnum() else "_" for c in name)


def final(run: dict) -> dict:
  """What a finished run is compared by: its params and optimiser state."""
  return {"params": run["params"], "opt_state": run["opt_state"]}


def checkpoint_all(root: pathlib.Path) -> dict:
  """Trains every case to the middle of the third task and saves all the runs (one save).

  Returns each case's uninterrupted final run (keyed by ``key``): the same
  in-memory runs, trained on to the end without a save and restore.
  """
  halves = {n: train(n, init_run(n), HALF) for n in CASES}
  save(root / "ckpt", {key(n): _to_disk(run) for n, run in halves.items()})
  return {key(n): final(train(n, run, TASKS * STEPS)) for n, run in halves.items()}


def finish_all(root: pathlib.Path) -> None:
  """Restores every case's run, trains it to the end, saves params and opt state."""
  target = {key(n): _to_disk(init_run(n)) for n in CASES}
  runs = restore(root / "ckpt", target)
  finals = {}
  for name in CASES:
    run = _from_disk(runs[key(name)])
    assert int(run["step"]) == HALF, int(run["step"])
    finals[key(name)] = final(train(name, run, TASKS * STEPS))
    print(f"{name}: finished", flush=True)
  save(root / "final", finals)


if __name__ == "__main__":
  finish_all(pathlib.Path(sys.argv[1]))
