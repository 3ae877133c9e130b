"""Flax NNX models in the runner: any ``nnx.Module`` factory, and the ``--model`` registry.

The runner trains a model through three functions: ``init(key, input_shape,
n_outputs) -> params``, ``apply(params, x) -> logits`` and ``is_head(params)``
(labels of the output layer, for the methods that treat it apart). The plain-JAX
:class:`~benchmarks.continual.model.MLP` is one such model; :class:`NNXModel`
makes one of any Flax NNX module: its parameters are the module's ``nnx.Param``
state as a plain nested dict (``nnx.to_pure_dict``), so every optax transform and
``cl_optax.consolidate`` see an ordinary pytree, and ``apply`` merges them back
into the module (``nnx.merge``) inside the jitted step.

Registry (``--model``): ``mlp`` (the preset's MLP, the default) and ``cnn``
(:class:`SmallCNN`). ``gpm`` reads every layer's inputs through
``model.layer_inputs(params, x)``: :class:`NNXModel` records the inputs of each
``nnx.Linear`` and ``nnx.Conv`` it calls (at the path of its kernel, whatever the
attribute names), so ``gpm`` projects those kernels of any NNX module.
``ncl_kfac`` (layer taps on the outputs) needs the MLP; the others train any model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import cl_optax
from benchmarks.continual.model import MLP

PyTree = Any


def head_labels(params: PyTree) -> PyTree:
  """True on the leaves under a key named ``head`` (the output layer by convention)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: any(getattr(k, "key", getattr(k, "name", None)) == "head" for k in path),
    params,
  )


class NNXModel:
  """A Flax NNX module as a runner model.

  Args:
    factory: ``rngs -> nnx.Module``; the module maps a batch ``[n, *input_shape]``
      to logits ``[n, n_outputs]`` (the stream's ``n_outputs``). Name its output
      layer ``head`` so that methods which treat the head apart (``soft_mask``;
      ``gpm``, which leaves it unprojected on multi-head streams) find it.
    name: shown in the records.
    shaped: the factory takes ``(rngs, input_shape, n_outputs)`` (the
      registry's models, built for each stream's shapes).

  The module's non-parameter state (e.g. BatchNorm statistics) is held fixed at
  its initial value: train models without mutable state, or in eval mode.
  """

  @property
  def layers(self):
    raise ValueError(
      f"{self.name}: ncl_kfac adds taps to every layer's outputs and needs the MLP (--model mlp)."
    )

  def __init__(self, factory: Callable[..., nnx.Module], name: str = "nnx", *, shaped=False):
    self.factory, self.name, self.shaped = factory, name, shaped
    self.graph = None  # (graphdef, non-parameter state, input shape), set by init

  def init(self, key: jax.Array, input_shape: tuple[int, ...], n_outputs: int) -> dict:
    rngs = nnx.Rngs(params=key)
    module = self.factory(rngs, input_shape, n_outputs) if self.shaped else self.factory(rngs)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    self.graph = (graphdef, rest, tuple(int(d) for d in input_shape))
    params = nnx.to_pure_dict(params)
    out = jax.eval_shape(self.apply, params, jax.ShapeDtypeStruct((2, *input_shape), jnp.float32))
    if out.shape != (2, n_outputs):
      raise ValueError(
        f"{self.name}: the model maps a batch [2, *{tuple(input_shape)}] to {out.shape}; "
        f"the stream needs logits [2, {n_outputs}]."
      )
    return params

  def apply(self, params: dict, x: jax.Array) -> jax.Array:
    if self.graph is None:
      raise ValueError(f"{self.name}: call init before apply.")
    graphdef, rest, shape = self.graph
    return nnx.merge(graphdef, params, rest)(x.reshape((x.shape[0], *shape)))

  @staticmethod
  def is_head(params: PyTree) -> PyTree:
    return head_labels(params)

  def layer_inputs(self, params: dict, x: jax.Array) -> dict:
    """The inputs of every ``nnx.Linear`` and ``nnx.Conv`` the module calls at ``x``, at the
    path of its kernel: ``[n, d_in]`` (a dense layer's leading axes flattened) or a
    convolution's patches (:func:`cl_optax.conv_representations`), GPM's ``representations``.

    A layer called more than once (shared weights) or a convolution with input
    dilation, feature groups or a mask is left out (it has no one input matrix).
    """
    if self.graph is None:
      raise ValueError(f"{self.name}: call init before layer_inputs.")
    graphdef, rest, shape = self.graph
    module = nnx.merge(graphdef, params, rest)
    where = {id(m): tuple(path) for path, m in nnx.iter_modules(module)}
    seen: dict[tuple, Any] = {}
    calls: dict[tuple, int] = {}

    def record(layer, inputs):
      path = where.get(id(layer))
      if path is None:
        return
      calls[path] = calls.get(path, 0) + 1
      kernel = layer.kernel[...]
      if isinstance(layer, nnx.Conv):
        plain = layer.input_dilation in (1, None) and layer.feature_group_count == 1
        if (
          not plain
          or layer.mask is not None
          or isinstance(layer.padding, str)
          and (layer.padding.upper() not in ("SAME", "VALID"))
        ):
          return
        x = inputs.reshape((-1, *inputs.shape[-(kernel.ndim - 1) :]))  # one batch axis
        seen[path] = cl_optax.conv_representations(
          x, kernel.shape, strides=layer.strides or 1, padding=layer.padding,
          dilation=layer.kernel_dilation or 1,
        )  # fmt: skip
      else:
        seen[path] = inputs.reshape(-1, inputs.shape[-1])

    originals = {cls: cls.__call__ for cls in (nnx.Linear, nnx.Conv)}

    def tapped(cls):
      def call(layer, inputs, *args, **kwargs):
        record(layer, inputs)
        return originals[cls](layer, inputs, *args, **kwargs)

      return call

    try:
      for cls in originals:
        cls.__call__ = tapped(cls)
      module(x.reshape((x.shape[0], *shape)))
    finally:
      for cls, fn in originals.items():
        cls.__call__ = fn
    out: dict = {}
    for path, rep in seen.items():
      if calls[path] == 1:
        node = out
        for k in path:
          node = node.setdefault(k, {})
        node["kernel"] = rep
    return out

  def layer_labels(self, params: dict) -> PyTree:
    """True at the kernels :meth:`layer_inputs` fills (the layers GPM can project)."""
    if self.graph is None:
      raise ValueError(f"{self.name}: call init before layer_labels.")
    x = jax.ShapeDtypeStruct((2, *self.graph[2]), jnp.float32)
    reps = jax.eval_shape(self.layer_inputs, params, x)
    tapped = {
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_leaves_with_path(
        reps, is_leaf=lambda r: isinstance(r, cl_optax.ConvRepresentations)
      )
    }
    return jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p) in tapped, params)


class SmallCNN(nnx.Module):
  """Two 3x3 conv + 2x2 max-pool blocks (16, 32 channels), a ReLU dense layer, ``head``."""

  def __init__(self, input_shape, n_outputs: int, hidden: int = 100, *, rngs: nnx.Rngs):
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) == 1:  # flat pixels (the digits' 64): a square grey image
      side = int(round(input_shape[0] ** 0.5))
      if side * side != input_shape[0]:
        raise ValueError(
          f"cnn: needs images [h, w] or [h, w, c] (or a square number of flat pixels); "
          f"got inputs of shape {input_shape}."
        )
      input_shape = (side, side)
    self.image = input_shape
    h, w = input_shape[:2]
    channels = input_shape[2] if len(input_shape) > 2 else 1
    self.conv1 = nnx.Conv(channels, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(32 * (h // 4) * (w // 4), hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, n_outputs, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], *self.image))
    if x.ndim == 3:  # [n, h, w] grey images
      x = x[..., None]
    for conv in (self.conv1, self.conv2):
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), (2, 2))
    return self.head(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))


def _cnn(hidden: tuple[int, ...], bias: bool) -> NNXModel:
  del bias
  width = hidden[-1] if hidden else 100
  return NNXModel(lambda rngs, shape, n: SmallCNN(shape, n, width, rngs=rngs), "cnn", shaped=True)


# name -> (the preset's hidden widths, bias) -> model
MODELS: dict[str, Callable[[tuple[int, ...], bool], Any]] = {"mlp": MLP, "cnn": _cnn}


def make_model(model: Any, hidden: tuple[int, ...] = (100, 100), bias: bool = True) -> Any:
  """A runner model from a registry name (``"mlp"``, ``"cnn"``), a model object
  (``init``/``apply``/``is_head``) or an ``nnx.Module`` factory ``rngs -> module``."""
  if isinstance(model, str):
    if model not in MODELS:
      raise ValueError(f"unknown model {model!r}; registered: {sorted(MODELS)}")
    return MODELS[model](tuple(hidden), bias)
  if all(hasattr(model, a) for a in ("init", "apply", "is_head")):
    return model
  if callable(model):
    return NNXModel(model, getattr(model, "__name__", "nnx"))
  raise TypeError(f"`model` must be a name, a model or an nnx.Module factory; got {model!r}.")


def run_model(method, name: str, model: Any, hidden: tuple[int, ...], bias: bool, init: str,
              hp: dict) -> Any:  # fmt: skip
  """The runner's model for ``method``: its own (``Method.model``: HAT's gates, WSN's
  scores; it replaces the preset's MLP, any other model is refused) or the preset's /
  ``--model``'s, with the parameter init ``init``."""
  if method.model is not None:
    if not (isinstance(model, MLP) or isinstance(model, str) and model == "mlp"):
      raise ValueError(f"--model {model}: the method {name} trains its own model.")
    return method.model(hidden, bias, hp)
  out = make_model(model, hidden, bias)
  if init != "torch":  # --init agem: the A-GEM code's init, for the MLP
    if not isinstance(out, MLP):
      raise ValueError(f"--init {init}: only the MLP model has that init.")
    out = out._replace(scheme=init)
  return out
