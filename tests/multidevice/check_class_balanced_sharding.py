"""Run in its own process with 8 host devices (see tests/test_sharding.py).

The class-balanced memory (`replay.ClassBalanced`) split over ``data`` on a 4x2
(data, model) mesh, its items also over ``model``: `replay.add_balanced` (both
rules) and `replay.sample` (plain and balanced) under ``jit`` give the same
memory and draws as on one device, the memory keeps its sharding, and the
compiled ``add_balanced`` gathers no memory-sized array (neither the items nor
the slot labels: only the few per-shard partials of an argmax). Both with ``Auto``
axes (as ``examples/sharded_training.py``) and with ``Explicit`` ones (the default of
``jax.make_mesh``), where the writes and draws spell out their output shardings.
"""

import re

import host_devices  # noqa: E402, F401  (sets XLA_FLAGS before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cl_optax  # noqa: E402

K, D, C, B = 64, 16, 6, 8  # capacity, item width, classes, batch


def _specs():
  spec = cl_optax.replay.init_balanced(
    (jax.ShapeDtypeStruct((D,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)), K, C
  )
  return spec._replace(
    items=(P("data", "model"), P("data")),
    slot_class=P("data"),
    slot_rank=P("data"),
    class_count=P(),
    class_stream=P(),
    class_full=P(),
    write_count=P(),
  )


def _batches(n):
  rng = np.random.default_rng(0)
  for i in range(n):
    y = rng.choice(C, size=B, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05]).astype(np.int32)
    x = rng.normal(size=(B, D)).astype(np.float32) + y[:, None]
    yield jnp.asarray(x), jnp.asarray(y), jax.random.key(i)


def _fill(mem, add):
  for x, y, k in _batches(24):  # 192 items: full, then replacing
    mem = add(mem, (x, y), y, k)
  return mem


def _gathers(hlo):
  """All-gathers of a memory-sized array (a gather of the per-shard argmax partials, a few
  scalars, is how a reduction over a sharded axis ends)."""
  big = re.compile(rf"\[(\d+,)*({K}|{K * D}|{K // 4})(,\d+)*\]\S* all-gather(-start)?\(")
  return [ln for ln in hlo.splitlines() if big.search(ln)]


def main():
  assert jax.device_count() == 8, jax.devices()
  for kind in (AxisType.Auto, AxisType.Explicit):
    check(jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind)), kind.name)


def check(mesh, kind):
  shard = jax.tree.map(
    lambda s: NamedSharding(mesh, s), _specs(), is_leaf=lambda s: isinstance(s, P)
  )
  example = (jnp.zeros((D,)), jnp.zeros((), jnp.int32))
  for rule in ("greedy", "cbrs"):
    add = jax.jit(lambda m, b, y, k, r=rule: cl_optax.replay.add_balanced(m, b, y, key=k, rule=r))
    one = _fill(cl_optax.replay.init_balanced(example, K, C), add)
    mem0 = jax.device_put(cl_optax.replay.init_balanced(example, K, C), shard)
    eight = _fill(mem0, add)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for got, want in zip(jax.tree.leaves(eight), jax.tree.leaves(shard), strict=True):
      assert got.sharding.is_equivalent_to(want, got.ndim), (rule, got.sharding, want)
    assert int(np.asarray(eight.class_count).sum()) == K  # full
    x, y, k = next(_batches(1))
    hlo = add.lower(eight, (x, y), y, k).compile().as_text()
    assert not _gathers(hlo), f"{rule}: add_balanced gathers:\n" + "\n".join(_gathers(hlo))
    print(f"{kind} add_balanced {rule}: ok", flush=True)
    for balanced in (False, True):
      draw = jax.jit(lambda m, k, b=balanced: cl_optax.replay.sample(m, k, 16, balanced=b))
      (a, ok_a), (b, ok_b) = draw(one, jax.random.key(7)), draw(eight, jax.random.key(7))
      assert bool(jnp.all(ok_a)) and bool(jnp.all(ok_b))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    print(f"{kind} sample {rule}: ok", flush=True)


if __name__ == "__main__":
  main()
