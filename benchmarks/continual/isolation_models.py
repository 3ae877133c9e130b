"""The isolation methods' own models (Flax NNX): HAT's gated MLP and WSN's scored MLP.

Both are the runner's ReLU MLP (``layer0, ..., head``, one output column per class
of the stream; task ``t`` reads ``stream.columns[t]``) plus a model-side part:

- ``gated`` (HAT, Serra et al. 2018; ``joansj/hat`` ``networks/mlp_hat.py``): a task
  embedding ``emb{i} [max_tasks, units]`` per hidden layer; the layer's output is
  ``dropout(relu(W h + b)) * hat_gate(emb{i}[t], s, s_max)`` (gates after the ReLU and
  the dropout, as the official code), input dropout on ``x``.
- ``scored`` (WSN, Kang et al. 2022; ``ihaeyong/WSN`` ``networks/subnet.py``): a score
  ``scores{i}`` per hidden-layer weight; the layer uses ``wsn_mask(scores, keep) * W``
  (top-c straight-through), no biases (the PMNIST script's ``SubnetLinear``).

``forward(params, x, task=t, s=..., key=..., ...)`` is the training forward (the
method's ``loss`` hook calls it through ``Step.model``) and returns ``(logits,
gates)``. ``apply(params, x)`` is the evaluation forward of a method's
``eval_view``: HAT reads embedding row 0 at ``s = s_max`` (its view sets every row to
task ``d``'s), WSN uses the kernels as given (its view multiplies them by task
``d``'s stored mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cl_optax
from benchmarks.continual.model import mlp_layer_names
from benchmarks.continual.nnx_models import NNXModel

# PyTorch's Linear init, U(+-1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)); WSN's
# scores take the same init as the weights (subnet.py)
TORCH_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate <= 0.0:
    return h
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0)


class IsolationMLP(nnx.Module):
  """ReLU MLP ``layer0, ..., head`` with HAT embeddings (``kind="hat"``) or WSN scores
  (``kind="wsn"``) on its hidden layers."""

  def __init__(self, d_in: int, hidden, n_out: int, kind: str, max_tasks: int, bias: bool,
               rngs: nnx.Rngs):  # fmt: skip
    if kind not in ("hat", "wsn"):
      raise ValueError(f"IsolationMLP: kind must be 'hat' or 'wsn'; got {kind!r}.")
    self.kind, self.n_hidden = kind, len(hidden)
    sizes = (d_in, *hidden)
    names = mlp_layer_names(len(hidden) + 1)
    for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:])):
      setattr(self, names[i], nnx.Linear(m, k, use_bias=bias, kernel_init=TORCH_INIT, rngs=rngs))
      if kind == "hat":  # torch's Embedding init, N(0, 1)
        setattr(self, f"emb{i}", nnx.Param(jax.random.normal(rngs.params(), (max_tasks, k))))
      else:
        setattr(self, f"scores{i}", nnx.Param(TORCH_INIT(rngs.params(), (m, k))))
    self.head = nnx.Linear(sizes[-1], n_out, use_bias=bias, kernel_init=TORCH_INIT, rngs=rngs)

  def __call__(self, x, task=None, s=None, key=None, drop=(0.0, 0.0), s_max=400.0, keep=0.5):
    """Logits (``task=None``: the evaluation forward) or ``(logits, gates)`` (training)."""
    train = task is not None
    keys = (
      [None] * (self.n_hidden + 1)
      if key is None
      else list(jax.random.split(key, self.n_hidden + 1))
    )
    h = _dropout(x.reshape(x.shape[0], -1), drop[0], keys[0] if train else None)
    gates = []
    for i in range(self.n_hidden):
      layer = getattr(self, f"layer{i}")
      if self.kind == "wsn":
        w = layer.kernel[...]
        if train:
          w = cl_optax.wsn_mask(getattr(self, f"scores{i}")[...], keep) * w
        h = jax.nn.relu(h @ w + (layer.bias[...] if layer.bias is not None else 0.0))
        continue
      h = _dropout(jax.nn.relu(layer(h)), drop[1], keys[i + 1] if train else None)
      emb = getattr(self, f"emb{i}")[...]
      a = cl_optax.hat_gate(emb[task] if train else emb[0], s if train else s_max, s_max)
      gates.append(a)
      h = h * a
    logits = self.head(h)
    return (logits, gates) if train else logits


class IsolationModel(NNXModel):
  """:class:`IsolationMLP` as a runner model, with the training ``forward``."""

  def __init__(self, kind: str, hidden: tuple[int, ...], bias: bool, max_tasks: int):
    def factory(rngs, shape, n_out):
      return IsolationMLP(int(np.prod(shape)), hidden, n_out, kind, max_tasks, bias, rngs)

    super().__init__(factory, f"{kind}-mlp", shaped=True)
    self.kind, self.hidden, self.max_tasks = kind, tuple(hidden), max_tasks

  @property
  def layers(self) -> list[str]:
    """The dense layers' keys, input to output (``layer0, ..., head``)."""
    return mlp_layer_names(len(self.hidden) + 1)

  def forward(self, params: dict, x: jax.Array, **kw):
    """The training forward: ``(logits, gates)`` of task ``kw["task"]``."""
    if self.graph is None:
      raise ValueError(f"{self.name}: call init before forward.")
    graphdef, rest, shape = self.graph
    return nnx.merge(graphdef, params, rest)(x.reshape((x.shape[0], *shape)), **kw)


def gated(hidden: tuple[int, ...], bias: bool, hp: dict) -> IsolationModel:
  """HAT's model (``Method.model``): embeddings for ``hp["max_tasks"]`` tasks."""
  return IsolationModel("hat", hidden, bias, int(hp.get("max_tasks", 10)))


def scored(hidden: tuple[int, ...], bias: bool, hp: dict) -> IsolationModel:
  """WSN's model (``Method.model``): scores on every hidden layer, no biases."""
  del bias  # the official SubnetLinear has none
  return IsolationModel("wsn", hidden, False, 1)
