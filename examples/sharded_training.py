"""Continual training of a byte-level Transformer LM sharded over a (data, model) mesh.

The model is the NNX byte-level LM of ``continual_pretraining.py``; its
parameters live on a ``(data, model)`` mesh: every kernel (and embedding)
is split over ``model`` on its last axis, vectors (biases, norm scales) are
replicated, and every batch is split over ``data``. It trains over three
domains (standard-library packages, read from disk) with one of

  soft_mask  ``chain(adam, soft_mask())``; importance per domain: the
             standardised |gradient| of the domain loss through tanh (SPG's
             parameter-level rule), max-merged by ``consolidate``
  ewc        ``chain(ewc(strength), adam)``; importance per domain: the mean
             squared gradient of the domain's last steps (a batch Fisher)
  agem       ``chain(agem(), adam)``; the reference gradient on a batch drawn
             from a reservoir memory (``cl_optax.replay``) whose slots are
             split over ``data``; each domain's last batches are written to it

or ``all``, the three in one chain, ``chain(agem(), ewc(strength), adam,
soft_mask())``, consolidated with the soft mask's importance (in [0, 1]) as
EWC's too: one compiled step exercises every transform (what the tests run).
It calls ``cl_optax.consolidate`` between domains. The optimiser state shards
like the parameters: the transforms build their state from the sharded
parameters and ``consolidate`` keeps it there; this file only puts the scalar
step counts on every device.

  python examples/sharded_training.py --methods all,soft_mask,ewc,agem

runs on 8 host devices (``--xla_force_host_platform_device_count=8`` is set
here); ``--mesh 1x1`` runs the same numbers on one device. Multi-host, the way
it runs on several machines (here two processes of 4 host devices on
127.0.0.1, one global 4x2 mesh, cross-process collectives over gloo):

  python examples/sharded_training.py --processes 2 --process-id 0 --port 23456 &
  python examples/sharded_training.py --processes 2 --process-id 1 --port 23456

Every process computes the same global batches from the same seed and keeps
only its own shards (``jax.make_array_from_callback``), and runs one compiled
program at a time (``consolidate`` jitted, each step waited for): XLA:CPU's
gloo collectives can deadlock when two programs with collectives are in flight
at once. ``--out F`` writes the losses as JSON (process 0).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


def _devices_flag(n: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":  # the device count must be set before JAX starts
  _procs = int(sys.argv[sys.argv.index("--processes") + 1]) if "--processes" in sys.argv else 1
  _devices_flag(8 // _procs)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from continual_pretraining import DOMAINS, ByteLM, load_corpus, split, windows  # noqa: E402

import cl_optax  # noqa: E402

METHODS = ("all", "soft_mask", "ewc", "agem")
TINY = {
  "d": 32,
  "layers": 1,
  "heads": 2,
  "ff": 64,
  "length": 16,
  "dropout": 0.0,
  "batch": 8,
  "steps": 4,
  "impt_batches": 2,
  "lr": 3e-3,
  "ewc_strength": 100.0,
  "memory": 16,
  "max_bytes": 20_000,
  "domains": 3,
}


# ------------------------------------------------------------------ sharding
def param_spec(x, model_size: int) -> P:
  """Kernels and embeddings split over ``model`` on their last axis; vectors replicated."""
  shape = np.shape(x)
  if len(shape) >= 2 and shape[-1] % model_size == 0:
    return P(*([None] * (len(shape) - 1)), "model")
  return P()


def make_mesh(data: int, model: int):
  """A ``(data, model)`` mesh over the first ``data * model`` devices (all processes')."""
  return jax.make_mesh(
    (data, model),
    ("data", "model"),
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=jax.devices()[: data * model],
  )


def put(x, sharding) -> jax.Array:
  """A global array from a value every process holds in full (multi-host safe)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def data_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def sharding_mismatches(opt_state, params) -> tuple[int, list[str]]:
  """The state leaves shaped like a parameter whose sharding is not that parameter's.

  A state leaf matches a parameter when its key path ends with the
  parameter's key path and the shapes agree (adam's ``mu``/``nu``, EWC's
  anchor and Fisher, the soft mask's importance). Returns the number of
  leaves compared and a line per mismatch.
  """
  by_path = {jax.tree_util.keystr(k): p for k, p in jax.tree_util.tree_leaves_with_path(params)}
  checked, bad = 0, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    s = jax.tree_util.keystr(path)
    for ppath, p in by_path.items():
      if s.endswith(ppath) and np.shape(leaf) == np.shape(p):
        checked += 1
        if not leaf.sharding.is_equivalent_to(p.sharding, p.ndim):
          bad.append(f"{s}: {leaf.sharding.spec}, its parameter {p.sharding.spec}")
  return checked, bad


# ------------------------------------------------------------------ training
def make_transform(method: str, cfg: dict) -> optax.GradientTransformationExtraArgs:
  if method == "soft_mask":
    return optax.chain(optax.adam(cfg["lr"]), cl_optax.soft_mask())
  if method == "ewc":
    return optax.chain(cl_optax.ewc(cfg["ewc_strength"]), optax.adam(cfg["lr"]))
  if method == "agem":
    return optax.chain(cl_optax.agem(), optax.adam(cfg["lr"]))
  if method == "all":
    return optax.chain(
      cl_optax.agem(),
      cl_optax.ewc(cfg["ewc_strength"]),
      optax.adam(cfg["lr"]),
      cl_optax.soft_mask(),
    )
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def load_domains(cfg: dict) -> list[np.ndarray]:
  return [split(load_corpus(pk, kind, cfg["max_bytes"]))[0] for _, pk, kind in DOMAINS][
    : cfg["domains"]
  ]


def train(method: str, cfg: dict, mesh, domains, *, seed: int = 0, on_consolidate=None):
  """Trains ``method`` over ``domains`` on ``mesh``; returns the per-step losses.

  ``on_consolidate(opt_state, params, tx)`` runs after every consolidate.
  """
  model = ByteLM(cfg, nnx.Rngs(seed))
  graphdef, state = nnx.split(model, nnx.Param)
  host = nnx.to_pure_dict(state)
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x, mesh.shape["model"])), host)
  params = jax.tree.map(put, host, shardings)
  tx = make_transform(method, cfg)
  # Across processes, every compiled program (each eager op of `init` and
  # `consolidate` too) runs collectives over gloo. With several programs in
  # flight at once a process can enter one program's collective while its peer
  # is in another's, and both wait for ever (seen on 2 processes x 4 devices:
  # an all-reduce against an all-gather). So with more than one process the
  # loop runs one program at a time: consolidate as one jitted program, and
  # each program finished on every local device before the next is dispatched.
  multi = jax.process_count() > 1
  settle = jax.block_until_ready if multi else (lambda tree: tree)
  replicated = NamedSharding(mesh, P())
  # The transforms build every params-shaped leaf from the sharded params (eager
  # init keeps their sharding; a jitted init would leave it to XLA). Scalars
  # (step counts) are put on every device, as the compiled step returns them.
  opt_state = jax.tree.map(
    lambda x: x if isinstance(x.sharding, NamedSharding) else put(x, replicated),
    settle(tx.init(params)),
  )
  layout = jax.tree.map(lambda x: x.sharding, opt_state)
  row = data_sharding(mesh, 2)
  memory = None
  if method in ("agem", "all"):
    example = jnp.zeros((cfg["length"] + 1,), jnp.int32)
    memory = cl_optax.replay.init(example, cfg["memory"])
    memory = memory._replace(items=put(memory.items, row), seen=put(memory.seen, replicated))
  consolidate = cl_optax.consolidate
  if multi:
    consolidate = jax.jit(cl_optax.consolidate, out_shardings=layout)

  def loss_fn(params, batch, weights=None):
    logits = nnx.merge(graphdef, params)(batch[:, :-1])
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(-1)
    if weights is None:
      return per.mean()
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  @jax.jit
  def step(params, opt_state, batch, memory, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    extra = {}
    if memory is not None:
      ref, valid = cl_optax.replay.sample(memory, key, cfg["batch"])
      extra["ref_grads"] = jax.grad(loss_fn)(params, ref, valid.astype(jnp.float32))
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    # Left to itself XLA may split adam's moments of a replicated bias like its
    # gradient; the step keeps params and state on their layout from init.
    params = jax.lax.with_sharding_constraint(params, shardings)
    return params, jax.lax.with_sharding_constraint(opt_state, layout), loss, grads

  @jax.jit
  def remember(memory, batch, key):
    memory = cl_optax.replay.add(memory, batch, key=key)
    return memory._replace(items=jax.lax.with_sharding_constraint(memory.items, row))

  @jax.jit
  def importance(grads):
    """From the gradients of the domain's last steps (no second compiled backward pass)."""
    if method == "ewc":  # mean squared (batch) gradient: an empirical Fisher
      return jax.tree.map(lambda *g: sum(x * x for x in g) / len(g), *grads)
    mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    return jax.tree.map(lambda g: jnp.tanh(jnp.abs(g) / (jnp.std(g) + 1e-12)), mean)

  rng = np.random.default_rng(seed + 1)
  key = jax.random.key(seed + 1)
  losses = []
  for t, data in enumerate(domains):
    recent = []
    for s in range(cfg["steps"]):
      batch = put(windows(data, cfg["batch"], cfg["length"], rng), row)
      params, opt_state, loss, grads = settle(
        step(params, opt_state, batch, memory, jax.random.fold_in(key, 1000 * t + s))
      )
      losses.append(float(loss))
      recent = (recent + [grads])[-cfg["impt_batches"] :]
      if memory is not None and s >= cfg["steps"] - cfg["impt_batches"]:
        memory = settle(remember(memory, batch, jax.random.fold_in(key, 10_000 * (t + 1) + s)))
    if t + 1 == len(domains):
      break
    if method == "agem":
      opt_state = settle(consolidate(opt_state, params))
    else:
      opt_state = settle(consolidate(opt_state, params, importance=settle(importance(recent))))
    if on_consolidate is not None:
      on_consolidate(opt_state, params, tx)
  return losses


def update_hlo(tx, opt_state, params, method: str) -> str:
  """The compiled optimiser update (no model): the text to search for all-gathers."""
  extra = {"ref_grads": params} if method in ("agem", "all") else {}
  fn = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
  return fn.lower(params, opt_state, params, extra).compile().as_text()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="all", help=f"comma-separated, of {METHODS}")
  parser.add_argument("--mesh", default="4x2", help="data x model, e.g. 4x2 or 1x1")
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=23456)
  parser.add_argument("--steps", type=int, default=TINY["steps"], help="steps per domain")
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id
    )
  cfg = dict(TINY, steps=args.steps)
  data, model = (int(n) for n in args.mesh.split("x"))
  mesh = make_mesh(data, model)
  domains = load_domains(cfg)
  results = {}
  for method in args.methods.split(","):
    start = time.perf_counter()
    results[method] = train(method, cfg, mesh, domains)
    print(
      f"{method}: losses {np.round(results[method], 4).tolist()} "
      f"({time.perf_counter() - start:.1f} s, {jax.process_count()} process(es), "
      f"mesh {dict(mesh.shape)})",
      flush=True,
    )
  if args.out is not None and jax.process_index() == 0:
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
  main()
