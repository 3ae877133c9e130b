"""The byte-level Transformer LM (Flax NNX) of ``examples/continual_pretraining.py``.

``ByteLM(cfg, rngs)``: a byte embedding and learned positions, ``cfg["layers"]``
pre-LN blocks (``nnx.MultiHeadAttention``'s projections and a GELU FFN), a final
LayerNorm and a 256-way head; ``cfg`` holds ``d``, ``layers``, ``heads``, ``ff``,
``length`` (positions kept) and ``dropout``. Every head, FFN unit and output unit
has a gate (DAS's), all ones by default. The example, ``examples/sharded_training.py``
and the overhead benchmarks (:mod:`benchmarks.lm`) build their models from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Pre-LN block: ``nnx.MultiHeadAttention``'s projections + a gated FFN."""

  def __init__(self, d: int, heads: int, ff: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=heads, in_features=d, qkv_features=d, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.ffn_in = nnx.Linear(d, ff, rngs=rngs)
    self.ffn_out = nnx.Linear(ff, d, rngs=rngs)

  def __call__(self, x, gates, mask, drop):
    # Attention from the layer's own query/key/value/out, with one gate per head
    # on the head's output (as a head mask on the attention probabilities).
    h = self.ln1(x)
    q, k, v = self.attn.query(h), self.attn.key(h), self.attn.value(h)  # [B, T, H, hd]
    heads = nnx.dot_product_attention(q, k, v, mask=mask) * gates["heads"][:, None]
    x = x + drop(self.attn.out(heads))
    # DAS gates: intermediate units before the activation, output units after
    # the output dense (ContinualLM networks/transformers/roberta.py).
    u = jax.nn.gelu(self.ffn_in(self.ln2(x)) * gates["ffn"])
    return x + drop(self.ffn_out(u) * gates["out"])


class ByteLM(nnx.Module):
  def __init__(self, cfg: dict, rngs: nnx.Rngs):
    d, self.d, self.heads, self.ff = cfg["d"], cfg["d"], cfg["heads"], cfg["ff"]
    self.layers, self.rate = cfg["layers"], cfg["dropout"]
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg["length"], d)))
    self.blocks = nnx.List([Block(d, self.heads, self.ff, rngs) for _ in range(self.layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, 256, rngs=rngs)

  def ones_gates(self):
    d = self.d
    return {
      "heads": jnp.ones((self.layers, self.heads)),
      "ffn": jnp.ones((self.layers, self.ff)),
      "out": jnp.ones((self.layers, d)),
    }

  def hidden(self, tokens, gates=None, key=None):
    """Last hidden states ``[B, T, d]``; dropout (rate ``cfg['dropout']``) iff ``key``."""
    gates = self.ones_gates() if gates is None else gates
    t = tokens.shape[1]
    x = self.embed(tokens) + self.pos[...][:t]
    mask = nnx.make_causal_mask(tokens)
    keys = [None] * self.layers if key is None else list(jax.random.split(key, self.layers))
    for layer, (block, k) in enumerate(zip(self.blocks, keys)):

      def drop(y, k=k):
        if k is None or self.rate == 0:
          return y
        k, sub = jax.random.split(k)
        keep = jax.random.bernoulli(sub, 1 - self.rate, y.shape)
        return jnp.where(keep, y / (1 - self.rate), 0.0)

      g = {name: gates[name][layer] for name in ("heads", "ffn", "out")}
      x = block(x, g, mask, drop)
    return self.ln(x)

  def __call__(self, tokens, gates=None, key=None):
    return self.lm_head(self.hidden(tokens, gates, key))
