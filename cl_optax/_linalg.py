"""Contractions that keep working on sharded leaves (shared by GEM, OGD, GPM)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def contract(a: jax.Array, b: jax.Array, axes: Any) -> jax.Array:
  """``jnp.tensordot`` whose (small) result is replicated across devices.

  On a mesh with explicit axes, contracting sharded dimensions must say how the
  result is sharded; a plain mesh (or none) takes the first path.
  """
  try:
    return jnp.tensordot(a, b, axes)
  except Exception as e:  # jax's ShardingTypeError is private
    if type(e).__name__ != "ShardingTypeError":
      raise
    mesh = jax.typeof(a).sharding.mesh
    return jnp.tensordot(a, b, axes, out_sharding=jax.sharding.NamedSharding(mesh, jax.P()))


def set_row(b: jax.Array, row: jax.Array, at: Any) -> jax.Array:
  """``b.at[at].set(row)`` in place; on an explicit mesh the row takes ``b``'s sharding."""
  row = row[None].astype(b.dtype)
  try:
    return jax.lax.dynamic_update_slice_in_dim(b, row, at, axis=0)
  except Exception as e:  # jax's ShardingTypeError is private
    if type(e).__name__ != "ShardingTypeError":
      raise
    row = jax.sharding.reshard(row, jax.typeof(b).sharding)
    return jax.lax.dynamic_update_slice_in_dim(b, row, at, axis=0)
