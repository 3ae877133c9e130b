"""The per-tensor normaliser SPG and DAS share: ``|tanh(standardise(x))|``."""

import jax
import jax.numpy as jnp


def standardised_tanh(g: jax.Array) -> jax.Array:
  """``|tanh((g - mean g) / std g)|`` over all of ``g`` (unbiased std), in [0, 1).

  A tensor whose entries are all equal (all zero, a constant up to float32
  rounding, a scalar, empty) has no entry more important than another and
  gets 0; the official SPG and DAS codes skip only the all-zero case and
  divide by a zero std otherwise (NaN).
  """
  g = g.astype(jnp.float32)
  if g.size <= 1:
    return jnp.zeros_like(g)
  top = jnp.max(jnp.abs(g))
  g = g / jnp.where(top > 0, top, 1.0)  # the result is scale-free; this avoids under/overflow
  centred = g - jnp.mean(g)
  std = jnp.sqrt(jnp.sum(centred**2) / (g.size - 1))
  spread = std > 1e-6  # constant up to float32 rounding of the mean: no entry beats another
  return jnp.where(spread, jnp.abs(jnp.tanh(centred / jnp.where(spread, std, 1.0))), 0.0)
