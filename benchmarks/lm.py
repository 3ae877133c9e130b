"""The Flax NNX Transformer LM of the continual pre-training example, at benchmark sizes.

The model is :class:`benchmarks.lm_model.ByteLM` (pre-LN blocks:
``nnx.MultiHeadAttention`` projections and a GELU FFN, byte vocabulary, learned
positions), built at about 10 M and 100 M parameters, with float32 or bfloat16
parameters. Everything here is functional: a plain nested dict of parameters and
``loss(params, tokens)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from benchmarks.lm_model import ByteLM

# d, layers, heads, ff: per block 4 d^2 (attention) + 2 d ff (FFN) weights.
CONFIGS = {
  "lm": {"d": 128, "layers": 4, "heads": 4, "ff": 512},  # the example's default, 0.88 M
  "lm-10m": {"d": 256, "layers": 12, "heads": 4, "ff": 1024},  # 9.6 M
  "lm-100m": {"d": 768, "layers": 14, "heads": 12, "ff": 3072},  # 99.5 M
}
LENGTH = 128  # context (positions kept in the model)


def lm_config(name: str) -> dict:
  return CONFIGS[name] | {"length": LENGTH if name != "lm" else 64, "dropout": 0.0}


@functools.cache
def _model_parts(name: str, seed: int = 0):
  from flax import nnx

  model = ByteLM(lm_config(name), nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params.to_pure_dict(), rest


def lm_params(name: str, dtype=jnp.float32, seed: int = 0) -> dict:
  """The model's parameters as a nested dict, cast to ``dtype``."""
  params = _model_parts(name, seed)[1]
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)


def lm_apply(name: str):
  """``apply(params, tokens [B, T]) -> logits [B, T, 256]`` (no dropout)."""
  from flax import nnx

  graphdef, template, rest = _model_parts(name)

  def apply(params, tokens, gates=None):
    state = nnx.State(template)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state, rest)
    return model(tokens, gates)

  return apply


def lm_loss(name: str):
  """``loss(params, batch [B, T + 1] int32)``: mean next-byte cross-entropy."""
  apply = lm_apply(name)

  def loss(params, batch):
    logits = apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:]
    ).mean()

  return loss


def lm_batch(batch: int, length: int = LENGTH, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, 256, jnp.int32)


def n_params(params) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))


if __name__ == "__main__":
  for name in CONFIGS:
    p = jax.eval_shape(lambda name=name: lm_params(name))
    print(name, n_params(p))
