"""The state of one seed of a run: its stream, batch plans, test sets and what its tasks advance."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.continual.evaluation import TestSets
from cl_optax import streams


@dataclasses.dataclass
class Seed:
  """One seed: its stream, batch plans and test sets, and the state its tasks advance."""

  seed: int
  stream: streams.Stream
  plans: list[np.ndarray]  # per task: shuffled example indices [steps, batch]
  n_max: int  # training examples of the largest task (every task is padded to it)
  s_max: int  # steps of the longest plan
  padded: bool  # some plan is shorter: the scan skips the steps past its end
  tests: TestSets
  rng: np.random.Generator  # batch order (plans, end-of-task epochs)
  key: jax.Array
  params: Any
  opt_state: Any
  aux: Any
  baseline: np.ndarray  # accuracies of the initial model
  R: np.ndarray  # the accuracy matrix so far
  t_wall: float
  start: int = 0  # the first task to train (after a resumed checkpoint)
  samples: int = 0
  train_s: float = 0.0
  end_s: float = 0.0
  compile_s: float = 0.0
  diverged: int | None = None  # the task whose loss was not finite
  note: str | None = None  # the stability note of the last task end

  @property
  def final(self) -> tuple:
    return self.params, self.opt_state, self.aux

  def arrays(self) -> dict:
    """The checkpointed arrays (``aux`` only when the method has one)."""
    arrays = {"params": self.params, "opt_state": self.opt_state, "key": self.key}
    return arrays | {"R": jnp.asarray(self.R)} | ({"aux": self.aux} if self.aux is not None else {})


TIMES = ("samples", "train_s", "end_s", "compile_s")  # counters a checkpoint keeps
