"""The benchmark model: a ReLU MLP whose output layer ``head`` holds every task's columns.

One definition for the continual runner and ``benchmarks/overhead.py``. ``Heads``
binds the forward passes to one stream's column layout, once per run, so the
estimators of ``cl_optax.importance`` (which jit with ``fn`` as a static argument)
see the same function object for every task and seed of that run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def mlp_layer_names(n_layers: int) -> list[str]:
  """``layer0, layer1, ..., head``: the keys of an MLP with ``n_layers`` dense layers."""
  return [f"layer{i}" for i in range(n_layers - 1)] + ["head"]


INITS = ("torch", "agem", "gem")


def mlp_init(key, sizes: tuple[int, ...], *, bias: bool = True, init: str = "torch") -> dict:
  """MLP parameters.

  ``init="torch"``: PyTorch's default Linear init, U(+-1/sqrt(fan_in)) for kernels and
  biases. ``init="agem"``: the A-GEM code's (facebookresearch/agem, model/model.py
  ``weight_variable``, ``bias_variable``): kernels from TF's
  ``truncated_normal_initializer(stddev=0.1)`` (a normal of std 0.1 redrawn outside
  +-2 std), biases the constant 0.1. ``init="gem"``: the GEM code's
  (facebookresearch/GradientEpisodicMemory, model/common.py ``Xavier``):
  kernels U(+-sqrt(6 / (fan_in + fan_out))) (Glorot uniform), biases 0.
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
    elif init == "gem":
      bound = np.sqrt(6.0 / (m + k))
      layer = {"kernel": jax.random.uniform(keys[2 * i], (m, k), jnp.float32, -bound, bound)}
      if bias:
        layer["bias"] = jnp.zeros((k,), jnp.float32)
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


class MLP(NamedTuple):
  """The model a method's ``make`` sees: hidden widths, layer names, head labels."""

  hidden: tuple[int, ...]
  bias: bool = True
  scheme: str = "torch"  # mlp_init's init: "torch", "agem" or "gem" (the official codes')
  name = "mlp"

  @property
  def layers(self) -> list[str]:
    """The dense layers' keys, input to output (``layer0, ..., head``)."""
    return mlp_layer_names(len(self.hidden) + 1)

  def init(self, key, input_shape: tuple[int, ...], d_out: int) -> dict:
    sizes = (int(np.prod(input_shape)), *self.hidden, d_out)
    return mlp_init(key, sizes, bias=self.bias, init=self.scheme)

  @staticmethod
  def apply(params: dict, x: jax.Array) -> jax.Array:
    return mlp_apply(params, x)

  @staticmethod
  def is_head(params: PyTree) -> PyTree:
    return is_head(params)

  @staticmethod
  def layer_inputs(params: dict, x: jax.Array) -> dict:
    """Every layer's input at the path of its kernel (:func:`mlp_layer_inputs`)."""
    return mlp_layer_inputs(params, x)

  @staticmethod
  def layer_labels(params: PyTree) -> PyTree:
    """True at the kernels :meth:`layer_inputs` fills (every layer's)."""
    return {k: jax.tree.map(lambda p: jnp.ndim(p) >= 2, v) for k, v in params.items()}


def head_logits(logits, columns, valid):
  """Gathers each example's head columns; inactive columns get -1e9."""
  cols = jnp.broadcast_to(columns, logits.shape[:1] + columns.shape[-1:])
  ok = jnp.broadcast_to(valid, cols.shape)
  return jnp.where(ok, jnp.take_along_axis(logits, cols, axis=1), -1e9)


def xent(logits, columns, valid, y):
  return optax.softmax_cross_entropy_with_integer_labels(head_logits(logits, columns, valid), y)


class Heads(NamedTuple):
  """The MLP's forward passes bound to one column layout (built once per run and layout).

  Attributes:
    columns: ``int32 [n_tasks, k]``, the output columns of each task.
    valid: ``bool [n_tasks, k]``, the columns active while training each task.
    logits: ``logits(params, x, head)``: the logits of task ``head``'s columns
      (the ``logits_fn`` of :func:`cl_optax.importance.spg`).
    task: ``task[t](params, x)``: the logits of task ``t`` (``fisher_diag``, ``mas``,
      ``output_gradients``).
    tapped: ``tapped[t](params, x, taps) -> (logits of task t, layer inputs)``
      (``kfac_factors``).
  """

  columns: np.ndarray
  valid: np.ndarray
  logits: Callable
  task: tuple[Callable, ...]
  tapped: tuple[Callable, ...]


def make_heads(columns: np.ndarray, valid: np.ndarray, model: Any = None) -> Heads:
  """The forward passes of every task head for this layout (one function object each);
  ``model`` defaults to the MLP (only the MLP has the ``tapped`` passes)."""
  cols, ok = jnp.asarray(columns), jnp.asarray(valid)
  apply = mlp_apply if model is None else model.apply

  def logits(p, x, head):
    return head_logits(apply(p, x), cols[head], ok[head])

  def tapped_for(t):
    c, o = jnp.asarray(columns[t]), jnp.asarray(valid[t])

    def fn(params, x, taps):
      if model is not None and not isinstance(model, MLP):
        model.layers  # noqa: B018  raises: the layer taps need the MLP
      out, inputs = mlp_tapped(params, x, taps)
      return head_logits(out, c, o), inputs

    return fn

  n = len(columns)
  task = tuple(functools.partial(logits, head=t) for t in range(n))
  return Heads(columns, valid, logits, task, tuple(tapped_for(t) for t in range(n)))
