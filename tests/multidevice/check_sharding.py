"""Run in its own process with 8 host devices (see tests/test_sharding.py).

Checks every continual transform listed in TRANSFORMS: its state shards like
the parameters at init and after consolidate, the jitted update keeps the
parameters' sharding, and the compiled update has no all-gather.
"""

import host_devices  # noqa: E402, F401  (sets XLA_FLAGS before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cl_optax  # noqa: E402

# name: (factory, state fields shaped like params, consolidate signal)
TRANSFORMS = {
  "soft_mask": (cl_optax.soft_mask, ("importance",), "importance"),
  "soft_mask_bf16": (
    lambda: cl_optax.soft_mask(importance_dtype=jnp.bfloat16),
    ("importance",),
    "importance",
  ),
  "freeze": (cl_optax.freeze, ("frozen",), "importance"),
  "ewc": (cl_optax.ewc, ("ewc_anchor", "ewc_importance"), "importance"),
  "online_ewc": (cl_optax.online_ewc, ("online_ewc_anchor", "online_ewc_importance"), "importance"),
  "mas": (cl_optax.mas, ("mas_anchor", "mas_importance"), "importance"),
  "si": (
    cl_optax.si,
    ("si_anchor", "si_importance", "path_integral", "prev_grad"),
    None,
  ),
  "ncl_diag": (lambda: cl_optax.ncl(100.0), ("prior_mean", "prior_precision"), "precision"),
  "rwalk": (
    lambda: cl_optax.rwalk(2.0, every=2),
    ("rwalk_anchor", "rwalk_importance", "rwalk_fisher", "rwalk_path", "rwalk_window"),
    None,
  ),
}


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  specs = {"kernel": P("data", "model"), "bias": P("model"), "table": P(None, "data")}
  shapes = {"kernel": (16, 8), "bias": (8,), "table": (3, 32)}
  params = {k: jax.device_put(jnp.ones(shapes[k]), NamedSharding(mesh, specs[k])) for k in shapes}
  imp = {k: jax.device_put(jnp.full(shapes[k], 0.5), NamedSharding(mesh, P())) for k in shapes}
  for name, (factory, fields, signal) in TRANSFORMS.items():
    tx = optax.chain(optax.adam(1e-3), factory())
    state = tx.init(params)
    for when in ("init", "consolidate"):
      for field in fields:
        leaves = optax.tree.get(state, field)
        for k in shapes:
          got = leaves[k].sharding
          assert got.is_equivalent_to(params[k].sharding, len(shapes[k])), (name, field, when, k)
      state = cl_optax.consolidate(state, params, **({signal: imp} if signal else {}))
    _check_update(name, tx, state, params, shapes)
  check_projection(mesh, params, specs, shapes)
  check_isolation(params, shapes)


def _check_update(name, tx, state, params, shapes, extra=None):
  """The compiled update (with `extra` args) gathers no sharded leaf and its updates shard
  like the params."""
  extra = extra or {}
  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
  hlo = update.lower(params, state, params, extra).compile().as_text()
  assert "all-gather" not in hlo, f"{name}: the compiled update gathers a sharded leaf"
  updates, _ = update(params, state, params, extra)
  for k in shapes:
    assert updates[k].sharding.is_equivalent_to(params[k].sharding, len(shapes[k])), (name, k)
  print(f"{name}: ok")


def check_isolation(params, shapes):
  """hat (O(units) state, outer-min in update) and packnet (owner map like the kernel)."""
  cases = {
    "hat": (cl_optax.hat(["kernel"]), {"gates": [jnp.linspace(0.0, 1.0, 8)]}),
    "packnet": (cl_optax.packnet(layers="kernel"), {"prune": 0.5, "finish": True}),
  }
  for name, (transform, signals) in cases.items():
    tx = optax.chain(optax.adam(1e-3), transform)
    state = tx.init(params)
    for when in ("init", "consolidate"):
      if name == "packnet":
        owner = state[1].packnet_owner["kernel"]
        assert owner.sharding.is_equivalent_to(params["kernel"].sharding, 2), when
      state = cl_optax.consolidate(state, params, **signals)
    _check_update(name, tx, state, params, shapes)


def check_projection(mesh, params, specs, shapes):
  """agem / gem / ogd: global dot products without gathering a sharded leaf."""

  def stacked(n):
    return {
      k: jax.device_put(
        jnp.stack(
          [(-1.0) ** i * (i + 1) * jnp.cos((i + 1) * jnp.ones(shapes[k])) for i in range(n)]
        ),
        NamedSharding(mesh, P(None, *specs[k])),
      )
      for k in shapes
    }

  neg = jax.tree.map(lambda p: -p, params)
  cases = {
    "agem": (cl_optax.agem(), {}, {"ref_grads": neg}),
    "gem": (cl_optax.gem(max_tasks=3), {}, {"task_grads": stacked(3)}),
    "ogd": (cl_optax.ogd(4), {"output_grads": stacked(2)}, {}),
  }
  for name, (transform, signals, extra) in cases.items():
    tx = optax.chain(transform, optax.sgd(0.1))
    state = tx.init(params)
    if signals:
      state = cl_optax.consolidate(state, params, **signals)
    if name == "ogd":  # the basis rows are sharded like the leaf, before and after consolidate
      for k in shapes:
        want = NamedSharding(mesh, P(None, *specs[k]))
        for block in state[0].basis:
          assert block[k].sharding.is_equivalent_to(want, 1 + len(shapes[k])), k
    _check_update(name, tx, state, params, shapes, extra)


if __name__ == "__main__":
  main()
