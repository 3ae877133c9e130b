"""The byte-level LM of :mod:`benchmarks.lm_model` with LoRA branches on every block's q and v.

``AdaptedLM(cfg, rngs)`` is :class:`benchmarks.lm_model.ByteLM` (same parameters,
same forward, DAS's gates and dropout) plus, per block, two :class:`SlottedLoRA`
modules: ``nnx.LoRA`` with ``cl_optax.adapters``' two slot parameters, so each
one is a LoRA branch of the library's convention (``lora_a``, ``lora_b``,
``lora_slots_a``, ``lora_slots_b``). ``lora_b`` and the slots start at zero, so
a fresh ``AdaptedLM`` computes exactly its base model.

``split_model`` gives the pure-dict halves that the benchmark trains (``base``:
every ``nnx.Param`` but the LoRA ones; ``lora``: the ``nnx.LoRAParam`` s) and
``make_apply`` the function ``apply(base, lora, tokens, gates=None, key=None,
capture=False)``; with ``capture`` it also returns each block's attention input
(the LayerNorm's output: InfLoRA's covariance input, the same for q and v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import cl_optax
from benchmarks.lm_model import ByteLM


class SlottedLoRA(nnx.LoRA):
  """``nnx.LoRA`` (``lora_a [d, r]``, ``lora_b [r, d]``) plus ``S`` zero slots."""

  def __init__(self, d: int, rank: int, slots: int, scale: float, rngs: nnx.Rngs):
    super().__init__(d, rank, d, rngs=rngs)
    self.lora_a[...] = cl_optax.adapters.kaiming_a(rngs.params(), (d, rank))
    self.lora_slots_a = nnx.LoRAParam(jnp.zeros((slots, d, rank)))
    self.lora_slots_b = nnx.LoRAParam(jnp.zeros((slots, rank, d)))
    self.scale = scale

  def __call__(self, x):
    return cl_optax.adapters.lora_apply(self, x, self.scale)


class AdaptedLM(ByteLM):
  def __init__(self, cfg: dict, rngs: nnx.Rngs):
    super().__init__(cfg, rngs)
    r, s = cfg["rank"], cfg["slots"]
    for block in self.blocks:
      block.lora_q = SlottedLoRA(self.d, r, s, cfg["alpha"] / r, rngs)
      block.lora_v = SlottedLoRA(self.d, r, s, cfg["alpha"] / r, rngs)

  def hidden(self, tokens, gates=None, key=None, capture=False):
    """``ByteLM.hidden`` with the branches added to q and v (and the block inputs)."""
    gates = self.ones_gates() if gates is None else gates
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    keys = [None] * self.layers if key is None else list(jax.random.split(key, self.layers))
    inputs = []
    for layer, (b, k) in enumerate(zip(self.blocks, keys)):

      def drop(y, k=k):
        if k is None or self.rate == 0:
          return y
        keep = jax.random.bernoulli(jax.random.split(k)[1], 1 - self.rate, y.shape)
        return jnp.where(keep, y / (1 - self.rate), 0.0)

      h = b.ln1(x)
      inputs.append(h)
      q, kk, v = b.attn.query(h), b.attn.key(h), b.attn.value(h)  # [B, T, H, hd]
      q = q + b.lora_q(h).reshape(q.shape)
      v = v + b.lora_v(h).reshape(v.shape)
      heads = nnx.dot_product_attention(q, kk, v, mask=mask) * gates["heads"][layer][:, None]
      x = x + drop(b.attn.out(heads))
      u = jax.nn.gelu(b.ffn_in(b.ln2(x)) * gates["ffn"][layer])
      x = x + drop(b.ffn_out(u) * gates["out"][layer])
    out = self.ln(x)
    return (out, inputs) if capture else out

  def __call__(self, tokens, gates=None, key=None):
    return self.lm_head(self.hidden(tokens, gates, key))


def split_model(model: AdaptedLM):
  """``(graphdef, base, lora, rest)``: the LoRA params and the others as pure dicts."""
  graphdef, lora, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(base), nnx.to_pure_dict(lora), (lora, base, rest)


def make_apply(graphdef, templates):
  """``apply(base, lora, tokens, gates=None, key=None, capture=False) -> logits[, inputs]``."""
  lora_t, base_t, rest = templates

  def merged(base, lora):
    b, lo = jax.tree.map(lambda x: x, base_t), jax.tree.map(lambda x: x, lora_t)  # copies
    nnx.replace_by_pure_dict(b, base)
    nnx.replace_by_pure_dict(lo, lora)
    return nnx.merge(graphdef, lo, b, rest)

  def apply(base, lora, tokens, gates=None, key=None, capture=False):
    model = merged(base, lora)
    if capture:
      h, inputs = model.hidden(tokens, gates, key, capture=True)
      return model.lm_head(h), inputs
    return model.lm_head(model.hidden(tokens, gates, key))

  def hidden(base, lora, tokens, gates=None, key=None):
    return merged(base, lora).hidden(tokens, gates, key)

  return apply, hidden
