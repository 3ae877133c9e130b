r"""Boundary-free streams of the loss-of-plasticity studies (Dohare et al., Nature 2024).

Both are jittable generators: a small ``cursor`` (a NamedTuple of arrays)
carries where the stream is, and ``next(cursor, batch_size)`` returns the
next batch and the advanced cursor, so a whole run is one ``lax.scan`` and
nothing per task is ever materialised beyond the current permutation.

- :func:`online_permuted`: online permuted MNIST. Each task draws a new
  pixel permutation *composed with the previous one*
  (:math:`P_t = P_{t-1}[p_t]`, as ``lop/permuted_mnist/online_expr.py``
  permutes the already permuted images) and a fresh order of the examples;
  each example is seen once per task.
- :func:`slowly_changing_regression`: a fixed target network of linear
  threshold units over 20 bits, 15 slow bits held for ``flip_after``
  examples (all redrawn, the README's data; or one flipped, ``flip_one``,
  the Nature variant) and 5 fast bits drawn every example.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpy.typing import ArrayLike

from cl_optax import _checks


class PermutedCursor(NamedTuple):
  """Where an :class:`OnlinePermuted` stream is.

  Attributes:
    perm_pixels: ``[d]`` int32, the current task's composed permutation.
    perm_order: ``[examples_per_task]`` int32, the example order of the task.
    perm_task: int32, the current task (``-1`` before the first).
    perm_position: int32, examples of the task already served.
  """

  perm_pixels: jax.Array
  perm_order: jax.Array
  perm_task: jax.Array
  perm_position: jax.Array


class RegressionCursor(NamedTuple):
  """Where a :class:`SlowlyChangingRegression` stream is.

  Attributes:
    reg_slow_bits: ``[n_slow]`` float32, the held bits.
    reg_key: the PRNG key of the stream.
    reg_step: int32, examples served so far.
  """

  reg_slow_bits: jax.Array
  reg_key: jax.Array
  reg_step: jax.Array


class OnlinePermuted:
  """Online permuted MNIST over flat images: see :func:`online_permuted`."""

  def __init__(self, images: jax.Array, labels: jax.Array, examples_per_task: int, seed: int):
    self.images, self.labels = images, labels
    self.examples_per_task = examples_per_task
    self.key = jax.random.PRNGKey(seed)

  def task_keys(self, task: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys of task ``task``'s pixel permutation and example order."""
    k = jax.random.fold_in(self.key, task)
    return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)

  def init(self) -> PermutedCursor:
    """A cursor before the first task (identity pixels; task 0 starts on the first ``next``)."""
    d = self.images.shape[1]
    return PermutedCursor(
      perm_pixels=jnp.arange(d, dtype=jnp.int32),
      perm_order=jnp.zeros((self.examples_per_task,), jnp.int32),
      perm_task=jnp.array(-1, jnp.int32),
      perm_position=jnp.array(self.examples_per_task, jnp.int32),
    )

  def start_task(self, c: PermutedCursor) -> PermutedCursor:
    """The cursor at the start of the next task (new composed permutation, new order)."""
    task = c.perm_task + 1
    kp, ko = self.task_keys(task)
    n, d = self.images.shape
    p = jax.random.permutation(kp, d).astype(jnp.int32)
    order = jax.random.permutation(ko, n).astype(jnp.int32)
    order = jnp.resize(order, (self.examples_per_task,))  # wraps when more than n examples
    return PermutedCursor(c.perm_pixels[p], order, task, jnp.zeros((), jnp.int32))

  def next(self, cursor: PermutedCursor, batch_size: int = 1):
    """``(cursor, x [b, d], y [b], task)``: the next ``batch_size`` examples of the stream."""
    c = jax.lax.cond(
      cursor.perm_position >= self.examples_per_task, self.start_task, lambda c: c, cursor
    )
    return self.take(c, batch_size)

  def take(self, c: PermutedCursor, batch_size: int = 1):
    """:meth:`next` within the current task, without the new-task check.

    A loop whose inner scan is exactly one task calls :meth:`start_task`
    once per task and ``take`` at each step: XLA's conditional may copy the
    cursor (the ``[examples_per_task]`` order) at each step.
    """
    idx = jax.lax.dynamic_slice(c.perm_order, (c.perm_position,), (batch_size,))
    x = self.images[idx][:, c.perm_pixels]
    y = self.labels[idx]
    return c._replace(perm_position=c.perm_position + batch_size), x, y, c.perm_task


def online_permuted(
  x: ArrayLike, y: ArrayLike, *, examples_per_task: int = 60_000, seed: int = 0
) -> OnlinePermuted:
  r"""Online permuted MNIST (Dohare et al., 2024): a boundary-free, jittable stream.

  Task :math:`t` serves ``examples_per_task`` examples (each once, in a
  fresh random order; wrapping around when it exceeds the data) with pixels
  permuted by :math:`P_t = P_{t-1}[p_t]`, :math:`p_t` a fresh uniform
  permutation; :math:`P_{-1}` is the identity. The keys of task :math:`t`
  are ``fold_in(fold_in(PRNGKey(seed), t), 0 | 1)``, so a run is
  reproducible and the permutation is derived inside ``jit``: 800 tasks
  never sit in memory. The metric of the paper is the online accuracy
  (prediction before the update) per task: :func:`cl_optax.metrics.online_accuracy`.

  Args:
    x: ``[n, ...]`` images (flattened here), float32 in [0, 1] as the
      official code feeds them (no normalisation).
    y: ``[n]`` integer labels.
    examples_per_task: examples per permutation; default 60 000 (official).
      ``next``'s ``batch_size`` must divide it.
    seed: the stream's seed (an int, or a traced integer to ``vmap`` over runs).

  Returns:
    An :class:`OnlinePermuted` with ``init() -> cursor`` and
    ``next(cursor, batch_size) -> (cursor, x, y, task)``.

  Example:
    >>> import jax, numpy as np
    >>> from cl_optax import streams
    >>> s = streams.online_permuted(np.eye(4, dtype=np.float32), np.arange(4), examples_per_task=4)
    >>> c = s.init()
    >>> c, xb, yb, task = s.next(c, 2)
    >>> xb.shape, int(task)
    ((2, 4), 0)
  """
  images = jnp.asarray(x, jnp.float32)
  images = images.reshape(images.shape[0], -1)
  labels = jnp.asarray(y, jnp.int32)
  if labels.shape != (len(images),):
    raise ValueError(f"online_permuted: y must be [n] with n = {len(images)}; got {labels.shape}.")
  _checks.check_hyperparameter(
    examples_per_task, transform="online_permuted", name="examples_per_task", low=1, integer=True
  )
  return OnlinePermuted(images, labels, int(examples_per_task), seed)


class SlowlyChangingRegression:
  """The slowly-changing regression problem: see :func:`slowly_changing_regression`."""

  def __init__(self, n_inputs, n_slow, n_hidden, beta, flip_after, flip_one, seed):
    self.n_inputs, self.n_slow = n_inputs, n_slow
    self.flip_after, self.flip_one = flip_after, flip_one
    k = jax.random.split(jax.random.PRNGKey(seed), 5)

    def signs(key, shape):
      return jax.random.randint(key, shape, 0, 2).astype(jnp.float32) * 2 - 1

    self.w1, self.b1 = signs(k[0], (n_inputs, n_hidden)), signs(k[1], (n_hidden,))
    self.w2, self.b2 = signs(k[2], (n_hidden,)), signs(k[3], ())
    n_negative = (n_inputs - self.w1.sum(0) + self.b1) / 2  # the official S, bias term included
    self.tau = beta * (n_inputs + 1) - n_negative
    self.key = k[4]

  def target(self, x: jax.Array) -> jax.Array:
    """``[b]``: the target network's output on bits ``x [b, n_inputs]``."""
    h = (x @ self.w1 + self.b1 > self.tau).astype(jnp.float32)
    return h @ self.w2 + self.b2

  def init(self) -> RegressionCursor:
    """A cursor at example 0 (the slow bits are drawn on the first ``next``)."""
    return RegressionCursor(
      jnp.zeros((self.n_slow,), jnp.float32), self.key, jnp.zeros((), jnp.int32)
    )

  def _change(self, bits: jax.Array, key: jax.Array, first: jax.Array) -> jax.Array:
    redraw = jax.random.bernoulli(key, 0.5, bits.shape).astype(jnp.float32)
    if not self.flip_one:
      return redraw
    i = jax.random.randint(jax.random.fold_in(key, 1), (), 0, self.n_slow)
    return jnp.where(first, redraw, bits.at[i].set(1.0 - bits[i]))

  def next(self, cursor: RegressionCursor, batch_size: int = 1):
    """``(cursor, x [b, n_inputs], y [b])``: the next ``batch_size`` examples."""
    key, k_slow, k_fast = jax.random.split(cursor.reg_key, 3)
    bits = jax.lax.cond(
      cursor.reg_step % self.flip_after == 0,
      lambda b: self._change(b, k_slow, cursor.reg_step == 0),
      lambda b: b,
      cursor.reg_slow_bits,
    )
    fast = jax.random.bernoulli(k_fast, 0.5, (batch_size, self.n_inputs - self.n_slow))
    x = jnp.concatenate([jnp.broadcast_to(bits, (batch_size, self.n_slow)), fast], axis=1)
    x = x.astype(jnp.float32)
    return RegressionCursor(bits, key, cursor.reg_step + batch_size), x, self.target(x)


def slowly_changing_regression(
  *,
  n_inputs: int = 20,
  n_slow: int = 15,
  n_hidden: int = 100,
  beta: float = 0.7,
  flip_after: int = 10_000,
  flip_one: bool = False,
  seed: int = 0,
) -> SlowlyChangingRegression:
  r"""Slowly-changing regression (Dohare et al., 2024): a boundary-free, jittable stream.

  Inputs are ``n_inputs`` bits: the first ``n_slow`` change only every
  ``flip_after`` examples, the rest are drawn i.i.d. every example. The
  target is a fixed net ``n_inputs -> n_hidden`` linear threshold units
  :math:`\to 1`, weights and biases uniform on :math:`\{-1, +1\}`, unit
  :math:`i` on when :math:`w_i^\top x + b_i > \tau_i`,
  :math:`\tau_i = \beta(m + 1) - S_i`, :math:`S_i = (m - \sum_j w_{ji} +
  b_i)/2` (``lop/nets/fix_ltu_net.py``, its bias term included),
  :math:`m` = ``n_inputs``.

  ``flip_one=False`` redraws all slow bits every ``flip_after`` examples
  (``cfg/prob.json``, the README's recipe behind the repository figure);
  ``flip_one=True`` flips one uniformly chosen slow bit (``flip_one_prob.json``,
  Nature Extended Data Fig. 2). The batch must divide ``flip_after``
  (the bits change only at a batch start).

  Args:
    n_inputs, n_slow, n_hidden, beta, flip_after: the problem (official
      values: 20, 15, 100, 0.7, 10 000).
    flip_one: the Nature variant.
    seed: draws the target net and the bits (an int, or a traced integer
      to ``vmap`` over runs: each run its own target, as officially).

  Returns:
    A :class:`SlowlyChangingRegression` with ``target(x)``, ``init()`` and
    ``next(cursor, batch_size) -> (cursor, x, y)``.

  Example:
    >>> from cl_optax import streams
    >>> s = streams.slowly_changing_regression(seed=0)
    >>> c, x, y = s.next(s.init(), 1)
    >>> x.shape, y.shape
    ((1, 20), (1,))
  """
  name = "slowly_changing_regression"
  for k, v in (("n_inputs", n_inputs), ("n_hidden", n_hidden), ("flip_after", flip_after)):
    _checks.check_hyperparameter(v, transform=name, name=k, low=1, integer=True)
  if not (isinstance(n_slow, int) and 0 < n_slow < n_inputs):
    raise ValueError(f"{name}: n_slow must be an int in [1, n_inputs); got {n_slow!r}.")
  return SlowlyChangingRegression(
    n_inputs, n_slow, n_hidden, float(beta), int(flip_after), bool(flip_one), seed
  )
