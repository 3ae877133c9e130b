"""HAT, PackNet and WSN in a Flax NNX loop: task-incremental split digits / split MNIST.

One MLP with a head per task (``head [T, hidden, k]``), Adam rebuilt at every
task (as the three official codes rebuild their optimiser). Old tasks are
**re-measured** after every task, each with its own view of the network:

  adam     plain fine-tuning (the heads are per task, the trunk is shared)
  hat      gates sigma(s e_t) after each hidden layer (``cl_optax.hat_gate``), s annealed
           per epoch (``hat_anneal``), ``losses.hat_regularizer``; ``cl_optax.hat`` masks
           the updates; evaluated with the task's gates at s_max
  packnet  ``cl_optax.packnet``: train, prune ``packnet_share(t, T)`` (exact zeros), retrain
           one epoch, finish; task d evaluated on ``packnet_params(params, state, d)``
  wsn      ``wsn_mask(scores, keep)`` in the forward; ``freeze`` on the kernels with the
           task's mask; task d evaluated with its stored mask (``WSNMasks``)

PackNet and WSN cannot forget in task-IL: their forgetting must print as exactly 0.

  python examples/flax_isolation.py --seeds 1
  python examples/flax_isolation.py --data ../shared/data/mnist.npz --epochs 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cl_optax
from cl_optax import metrics, streams

S_MAX = 400.0


class TaskMLP(nnx.Module):
  """784 (or 64) - h - h - per-task heads; HAT embeddings or WSN scores by ``kind``."""

  def __init__(self, d_in, hidden, tasks, k, kind, rngs):
    bias = kind != "wsn"
    self.l1 = nnx.Linear(d_in, hidden, use_bias=bias, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, use_bias=bias, rngs=rngs)
    init = nnx.initializers.lecun_normal()
    self.head = nnx.Param(init(rngs.params(), (tasks, hidden, k)))
    self.kind = kind
    if kind == "hat":
      self.e1 = nnx.Param(jax.random.normal(rngs.params(), (tasks, hidden)))
      self.e2 = nnx.Param(jax.random.normal(rngs.params(), (tasks, hidden)))
    if kind == "wsn":
      self.s1 = nnx.Param(init(rngs.params(), (d_in, hidden)))
      self.s2 = nnx.Param(init(rngs.params(), (hidden, hidden)))

  def __call__(self, x, t, s=S_MAX, masks=None, keep=0.5):
    """Logits of task ``t`` and the gates (HAT) of this forward."""
    gates = []
    h = x
    for i, layer in enumerate((self.l1, self.l2)):
      if self.kind == "wsn":
        scores = (self.s1, self.s2)[i][...]
        m = cl_optax.wsn_mask(scores, keep) if masks is None else masks[f"l{i + 1}"]["kernel"]
        h = jax.nn.relu(h @ (m * layer.kernel[...]))
      else:
        h = jax.nn.relu(layer(h))
      if self.kind == "hat":
        a = cl_optax.hat_gate((self.e1, self.e2)[i][...][t], s, S_MAX)
        gates.append(a)
        h = h * a
    return h @ self.head[...][t], gates


def make_tx(kind, lr):
  base = optax.adam(lr)
  if kind == "hat":
    iso = cl_optax.hat(["l1", "l2"], embeddings=["e1", "e2"], heads="head")
  elif kind == "packnet":
    iso = cl_optax.packnet(layers=["l1/kernel", "l2/kernel"], heads="head")
  elif kind == "wsn":
    iso = optax.masked(cl_optax.freeze(), lambda p: jax.tree.map(lambda _: False, p) | {
      "l1": {"kernel": True}, "l2": {"kernel": True}})  # fmt: skip
  else:
    return base, base
  return base, optax.chain(base, iso)


def run(kind, stream, args, seed):
  t_count, k = len(stream), int(stream.columns.shape[1])
  x0, _ = stream[0].train()
  model = TaskMLP(x0.shape[1], args.hidden, t_count, k, kind, nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda v: v, nnx.to_pure_dict(params))
  base, tx = make_tx(kind, args.lr)
  state = tx.init(params)
  forward = lambda p, x, t, s, m: nnx.merge(graphdef, nnx.State(p))(x, t, s, m, args.keep)  # noqa: E731

  def loss_fn(p, x, y, t, s, att):
    logits, gates = forward(p, x, t, s, None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + (cl_optax.losses.hat_regularizer(gates, att) if kind == "hat" else 0.0)

  @jax.jit
  def step(p, st, x, y, t, s, att):
    g = jax.grad(loss_fn)(p, x, y, t, s, att)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st

  @jax.jit
  def accuracy(p, x, y, t, m):
    return jnp.mean(jnp.argmax(forward(p, x, t, S_MAX, m)[0], -1) == y)

  rng = np.random.default_rng(seed)
  masks = cl_optax.WSNMasks.create({"l1": {"kernel": params["l1"]["kernel"]},
                                    "l2": {"kernel": params["l2"]["kernel"]}}, t_count)  # fmt: skip
  R = np.zeros((t_count, t_count))
  start, steps = time.perf_counter(), 0
  for t in range(t_count):
    state = _restart_base(kind, base, params, state)
    x, y = stream[t].train()
    att = _attention(kind, state)
    epochs = [args.epochs] + ([1] if kind == "packnet" else [])
    for phase, n_ep in enumerate(epochs):
      for _ in range(n_ep):
        order = rng.permutation(len(x))
        nb = len(x) // args.batch
        for b in range(nb):
          i = order[b * args.batch : (b + 1) * args.batch]
          s = cl_optax.hat_anneal(b * args.batch, nb * args.batch, S_MAX)
          params, state = step(params, state, x[i], y[i], t, s, att)
          steps += 1
      if kind == "packnet" and phase == 0:
        p_t = cl_optax.packnet_share(t, t_count)
        state = cl_optax.consolidate(state, params, prune=p_t)
        params, state = cl_optax.apply_pending_writes(params, state)
    if kind == "hat":
      gates = forward(params, x[:1], t, S_MAX, None)[1]
      state = cl_optax.consolidate(state, params, gates=gates)
    if kind == "packnet":
      state = cl_optax.consolidate(state, params, finish=True)
    if kind == "wsn":
      m = {f"l{i}": {"kernel": cl_optax.wsn_mask(params[f"s{i}"], args.keep)} for i in (1, 2)}
      masks = masks.store(t, m)
      imp = jax.tree.map(jnp.zeros_like, params) | m
      state = cl_optax.consolidate(state, params, importance=imp)
    for d in range(t + 1):
      xt, yt = stream[d].test()
      p_d = cl_optax.packnet_params(params, state, d + 1) if kind == "packnet" else params
      m_d = masks.mask(d) if kind == "wsn" else None
      R[t, d] = float(accuracy(p_d, xt, yt, d, m_d))
  return R, steps * args.batch / (time.perf_counter() - start), _capacity(kind, state, masks)


def _restart_base(kind, base, params, state):
  """A fresh Adam at each task (the official codes rebuild their optimiser)."""
  if kind == "adam":
    return base.init(params)
  return (base.init(params), *state[1:])


def _attention(kind, state):
  if kind != "hat":
    return None
  return list(optax.tree.get(state, "hat_attention"))


def _capacity(kind, state, masks):
  """Fraction of the trunk's units (HAT) or weights (PackNet, WSN) each task uses."""
  if kind == "hat":
    return [float(jnp.mean(a > 0.5)) for a in optax.tree.get(state, "hat_attention")]
  if kind == "packnet":
    own = optax.tree.get(state, "packnet_owner")
    flat = np.concatenate([np.ravel(o) for o in jax.tree.leaves(own)])
    return [float(np.mean(flat == t)) for t in range(1, int(flat.max()) + 1)]
  if kind == "wsn":
    return [float(np.mean(jax.tree.leaves(masks.used(t)))) for t in range(masks.wsn_bits["l1"]
            ["kernel"].shape[0])]  # fmt: skip
  return []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="adam,hat,packnet,wsn")
  parser.add_argument("--data", default=None, help="mnist .npz (default: sklearn digits)")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=100)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--keep", type=float, default=0.5, help="WSN's kept fraction c")
  args = parser.parse_args()
  data = streams.load_digits() if args.data is None else streams.load_mnist(args.data)
  flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
  test = None if data.x_test is None else (flat(data.x_test), data.y_test)
  stream = streams.split(flat(data.x_train), data.y_train, scenario="task", test=test, seed=0)
  print(f"{stream.name}: accuracy re-measured on every task after every task")
  for kind in args.methods.split(","):
    for seed in range(args.seeds):
      R, rate, cap = run(kind, stream, args, seed)
      drop = max(float(np.max(R[t, t] - R[t:, t])) for t in range(len(stream)))
      what = "units used per layer" if kind == "hat" else "weights per task"
      print(
        f"{kind:8s} seed {seed}: accuracy {metrics.average_accuracy(R):.4f} "
        f"forgetting {metrics.forgetting(R):.4f} (largest drop {drop!r}) "
        f"{rate:.0f} samples/s, {what} {[round(c, 3) for c in cap]}"
      )


if __name__ == "__main__":
  main()
