"""Run in its own process with 8 host devices (see tests/test_writes_resets.py).

boundary_writes: the pending write (targets, mask) shards like the parameters
at init and after consolidate; the jitted update and apply_pending_writes keep
the parameters' sharding without an all-gather. unit_resets: the jitted
update (with a reset) keeps the sharding without an all-gather; so does
continual_backprop's (its selector and the next-bias write). olora and
inflora on a model with a LoRA branch: the pending slot write and the inner
moments shard like the adapter leaves, and the jitted update (with a slot
write pending) gathers no base kernel.
"""

import re

import host_devices  # noqa: E402, F401  (sets XLA_FLAGS before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cl_optax  # noqa: E402


def _same(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  specs = {
    "l1": {"kernel": P("data", "model"), "bias": P("model")},
    "l2": {"kernel": P("model", "data"), "bias": P("data")},
  }
  shapes = {"l1": {"kernel": (16, 8), "bias": (8,)}, "l2": {"kernel": (8, 4), "bias": (4,)}}
  is_shape = lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)  # noqa: E731
  params = jax.tree.map(
    lambda s, spec: jax.device_put(
      jnp.arange(np.prod(s), dtype=jnp.float32).reshape(s) / 10 + 1, NamedSharding(mesh, spec)
    ),
    shapes,
    specs,
    is_leaf=is_shape,
  )
  rep = NamedSharding(mesh, P())
  mask = jax.tree.map(
    lambda p: jax.device_put(jnp.arange(p.size).reshape(p.shape) % 2 == 0, rep), params
  )

  tx = optax.chain(optax.adam(1e-3), cl_optax.boundary_writes())
  state = tx.init(params)
  for when in ("init", "consolidate"):
    for field in ("write_target", "write_mask"):
      for got, p in zip(jax.tree.leaves(optax.tree.get(state, field)), jax.tree.leaves(params)):
        assert _same(got, p), (field, when)
    state = cl_optax.consolidate(state, params, writes=0.0, write_mask=mask)
  update = jax.jit(tx.update)
  hlo = update.lower(params, state, params).compile().as_text()
  assert "all-gather" not in hlo, "boundary_writes: the compiled update gathers a sharded leaf"
  updates, _ = update(params, state, params)
  assert all(_same(u, p) for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)))
  apply = jax.jit(cl_optax.apply_pending_writes)
  hlo = apply.lower(params, state).compile().as_text()
  assert "all-gather" not in hlo, "apply_pending_writes gathers a sharded leaf"
  now, _ = apply(params, state)
  assert all(_same(u, p) for u, p in zip(jax.tree.leaves(now), jax.tree.leaves(params)))
  print("boundary_writes: ok")

  tx = cl_optax.unit_resets(
    optax.adam(1e-3), layers=[("l1/kernel", "l1/bias", "l2/kernel")], max_units=2
  )
  state = tx.init(params)
  h = jax.device_put(jnp.ones((6, 8)).at[:, 3].set(0.0), NamedSharding(mesh, P(None, "model")))
  update = jax.jit(lambda g, s, p, h: tx.update(g, s, p, activations=[h]))
  hlo = update.lower(params, state, params, h).compile().as_text()
  # only the [n] per-unit scores are gathered (lax.top_k needs the whole unit axis)
  gathered = [ln for ln in hlo.splitlines() if re.search(r"all-gather(-start)?\(", ln)]
  for ln in gathered:
    assert re.search(r"= \w+\[8\]", ln), f"unit_resets gathers more than a unit vector: {ln}"
  updates, state = update(params, state, params, h)
  assert bool(state.reset_units[0][3])
  assert all(_same(u, p) for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)))
  print(f"unit_resets: ok ({len(gathered)} gathers of [n] unit vectors)")

  # continual backprop: its selector's top_k and the next-bias absorption, same rule
  tx = cl_optax.continual_backprop(
    optax.adam(1e-3),
    layers=[("l1/kernel", "l1/bias", "l2/kernel", "l2/bias")],
    replacement_rate=0.5,
    maturity_threshold=0,
    max_units=2,
  )
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, h: tx.update(g, s, p, activations=[h]))
  hlo = update.lower(params, state, params, h).compile().as_text()
  gathered = [ln for ln in hlo.splitlines() if re.search(r"all-gather(-start)?\(", ln)]
  for ln in gathered:
    assert re.search(r"= \w+\[8\]", ln), f"continual_backprop gathers more than [n]: {ln}"
  updates, state = update(params, state, params, h)
  assert int(state.reset_units[0].sum()) == 2
  assert all(_same(u, p) for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)))
  print(f"continual_backprop: ok ({len(gathered)} gathers of [n] unit vectors)")

  _adapters(mesh)


def _adapters(mesh):
  specs = {
    "kernel": P("data", "model"),
    "lora_a": P("data", None),
    "lora_b": P(None, "model"),
    "lora_slots_a": P(None, "data", None),
    "lora_slots_b": P(None, None, "model"),
  }
  branch = cl_optax.adapters.lora_init(jax.random.key(0), 16, 8, rank=2, slots=3)
  branch["kernel"] = jnp.ones((16, 8))
  params = {"q": {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in branch.items()}}
  cov = {"q": jnp.eye(16)}
  for name, tx, signals in [
    ("olora", cl_optax.olora(optax.adam(1e-3)), {}),
    ("inflora", cl_optax.inflora(optax.adam(1e-3)), {"next_covariance": cov, "covariance": cov}),
  ]:
    state = cl_optax.consolidate(tx.init(params), params, **signals)
    write = state[1]
    for field in (write.write_target, write.write_mask):
      for k, got in field["q"].items():
        if k != "kernel":
          assert _same(got, params["q"][k]), (name, k)
    for k, got in state[0][0].mu["q"].items():
      assert _same(got, params["q"][k]), (name, "mu", k)
    update = jax.jit(tx.update)
    hlo = update.lower(params, state, params).compile().as_text()
    gathered = [ln for ln in hlo.splitlines() if re.search(r"all-gather(-start)?\(", ln)]
    for ln in gathered:
      assert not re.search(r"= \w+\[16,8\]", ln), f"{name} gathers the base kernel: {ln}"
    updates, state = update(params, state, params)
    for k, u in updates["q"].items():
      assert _same(u, params["q"][k]), (name, k)
    print(f"{name}: ok ({len(gathered)} gathers, none of the base kernel)")


if __name__ == "__main__":
  main()
