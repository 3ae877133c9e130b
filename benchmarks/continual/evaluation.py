"""Evaluation: the jitted accuracy of one head and the padded test sets of a stream."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.continual.model import head_logits, mlp_apply
from benchmarks.continual.trainer import pad_rows
from cl_optax import streams


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
    """Accuracy on every task; ``params`` is the evaluated pytree, or ``j -> pytree``
    (a method's view of task ``j``, ``Method.eval_view``)."""
    accs = []
    cols = self.stream.columns
    for j in range(len(self.stream)):
      x, y, w = self.get(j)
      p = params(j) if callable(params) else params
      c, n = evaluate(p, x, y, w, jnp.asarray(cols[j]), jnp.asarray(eval_valid[j]))
      accs.append(float(c) / float(n))
    return np.asarray(accs)
