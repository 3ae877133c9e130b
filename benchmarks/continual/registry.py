"""The method registry: what a method's hooks get, and the table of registered methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.model import Heads

PyTree = Any

BASES = {"sgd": optax.sgd, "adam": optax.adam}


class Hyper(NamedTuple):
  """What a method's `make` gets: the optimiser choice, hyper-parameters and the model."""

  optimizer: str  # "sgd" or "adam": the base optimiser of the protocol
  lr: float
  hp: dict  # the method's hyper-parameters (defaults < protocol settings < --hp)
  model: Any  # `model.is_head(params)`; `model.layers` (the MLP's layer keys), `layer_inputs`

  def base(self) -> optax.GradientTransformation:
    return BASES[self.optimizer](self.lr)


class Step(NamedTuple):
  """What a method's `step` hook sees, inside the jitted scan (arrays are traced)."""

  params: PyTree
  x: jax.Array  # the current batch
  y: jax.Array
  task: jax.Array  # int32 scalar, index of the current task
  n_tasks: int  # static
  aux: PyTree  # the method's own carried state (e.g. a replay memory)
  key: jax.Array  # a fresh PRNG key for this step
  # loss_fn(params, x, y, task_ids, weights=None) -> (weighted) mean CE, each example over
  # its own task's columns that are active now
  loss_fn: Callable
  hp: dict
  apply: Callable  # apply(params, x) -> logits over every output unit
  columns: jax.Array  # int32 [n_tasks, k]: each task's output columns
  valid: jax.Array  # bool [n_tasks, k]: the columns active while training each task
  index: Any = 0  # int32 scalar (traced): the step's index within the task's plan
  epoch_steps: Any = 1  # int32 scalar (traced): the steps of one epoch of this task
  model: Any = None  # the runner's model (a method's own forward, e.g. HAT's gates at s)

  def epoch_index(self) -> jax.Array:
    """The step's index within its epoch (HAT anneals s over each epoch)."""
    return jnp.asarray(self.index) % jnp.maximum(jnp.asarray(self.epoch_steps), 1)


class AuxInit(NamedTuple):
  """What a method's `init_aux` gets (once per seed, before task 0)."""

  n_tasks: int
  input_shape: tuple[int, ...]
  hp: dict
  n_outputs: int  # the model's output units
  params: PyTree = None  # the initial parameters (for state shaped like them)


class TaskEnd(NamedTuple):
  """What a method's `end_task` hook gets after training task `task` (eager)."""

  task: int
  params: PyTree
  opt_state: PyTree
  aux: PyTree
  batches: tuple[jax.Array, jax.Array]  # the task's training data, [n_batches, B, ...]
  heads: Heads  # the model's forward passes per task head (one object per run and layout)
  hp: dict
  key: jax.Array
  model: Any = None  # the runner's model (`init`, `apply`, `is_head`, `layer_inputs`, ...)
  # retrain(params, opt_state, aux, epochs) -> (params, opt_state, aux): more epochs of the
  # runner's jitted step on this task's data (PackNet's retraining after the prune)
  retrain: Callable | None = None
  n_tasks: int = 0  # tasks in the stream
  next_task: Any = None  # the stream's next task (its `train()` data), None after the last

  def first_batches(self, n: int | None) -> cl_optax.importance.Batches:
    """The first batches holding at least ``n`` examples (``None``: every batch)."""
    xs, ys = self.batches
    if n is not None:
      k = max(1, -(-int(n) // xs.shape[1]))
      xs, ys = xs[:k], ys[:k]
    return cl_optax.importance.Batches(xs, ys)

  def examples(self, n: int) -> tuple[jax.Array, jax.Array]:
    """The first ``n`` training examples, flat: ``x [n, ...]``, ``y [n]``."""
    xs, ys = self.batches
    return xs.reshape(-1, *xs.shape[2:])[:n], ys.reshape(-1)[:n]

  def upcoming(self, n: int) -> tuple[jax.Array, jax.Array]:
    """The next task's first ``n`` training examples (stream order), as :meth:`examples`:
    what a method looks at before training that task (TRGP's trust region)."""
    if self.next_task is None:
      raise ValueError(f"task {self.task} is the stream's last: it has no next task.")
    x, y = self.next_task.train()
    return jnp.asarray(x[:n].astype("float32")), jnp.asarray(y[:n])


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
    loss: ``(Step, params) -> scalar``, a term added to the training loss
      inside the jitted step (DER's logit replay, LwF's distillation); it sees
      the aux as it was before ``step``.
    defaults: the method's hyper-parameters (``--hp name=value`` overrides;
      a paper's settings for one protocol go in ``paper_settings.SETTINGS``).
    own_loss: the ``loss`` hook is the whole training loss (ER-ACE's
      asymmetric CE replaces the runner's CE on the current batch).
    finish_task: ``TaskEnd -> (params, opt_state, aux)`` after every task's
      training, the last included, *before* it is evaluated (GDumb's retrain
      from scratch on the memory, WA's alignment, iCaRL's memory rebuild).
    eval_apply: ``(model, (params, aux), x) -> logits`` to evaluate with
      instead of the network's outputs (iCaRL's nearest mean of exemplars).
    eval_view: ``(params, opt_state, aux, d) -> params`` of the model's
      structure, evaluated on task ``d`` instead of the live parameters (the
      isolation methods: PackNet's ``packnet_params``, WSN's weights under task
      ``d``'s stored mask, HAT's gates of task ``d``). Jittable, ``d`` an int.
    model: ``(hidden, bias, hp) -> model``: the method's own model (``init``,
      ``apply``, ``is_head``; HAT's gated and WSN's scored MLP) instead of the
      preset's; ``apply(params, x)`` is the evaluation forward.
    capacity: ``(params, opt_state, aux, n_tasks) -> [fraction per task]``:
      the share of units / weights each task owns, recorded as ``capacity``.
  """

  name: str
  make: Callable[[Hyper], optax.GradientTransformation]
  doc: str = ""
  optimizer: str | None = None
  end_task: Callable[[TaskEnd], tuple[PyTree, PyTree]] | None = None
  init_aux: Callable[[AuxInit], PyTree] | None = None
  step: Callable[[Step], tuple[dict, PyTree]] | None = None
  loss: Callable[[Step, PyTree], jax.Array] | None = None
  defaults: dict = {}
  own_loss: bool = False
  finish_task: Callable[[TaskEnd], tuple[PyTree, PyTree, PyTree]] | None = None
  eval_apply: Callable | None = None
  eval_view: Callable[[PyTree, PyTree, PyTree, int], PyTree] | None = None
  model: Callable[[tuple[int, ...], bool, dict], Any] | None = None
  capacity: Callable[[PyTree, PyTree, PyTree, int], list[float]] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f"register: a method named {method.name!r} is already registered.")
  METHODS[method.name] = method
  return method
