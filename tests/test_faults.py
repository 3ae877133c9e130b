"""Every fault, one table: bad input to the public API gets a clear error or a checked pass-through.

Each row of ``FAULTS`` is one function x one fault. Either the call raises
``error`` with a message matching ``match`` (it names the argument or leaf and
what was expected), or the fault is a documented pass-through and ``check``
verifies the result value by value. ``STATE_FAULTS`` re-runs the errors that
hit an existing optimiser state and checks that the caller's state is
unchanged and still consolidates and updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import cl_optax
from cl_optax import losses, replay, streams
from cl_optax import metrics as M
from cl_optax.importance import (
  Batches,
  KronFactors,
  fisher_diag,
  kfac_factors,
  mas_sensitivity,
  output_gradients,
)

NAN, INF = float("nan"), float("inf")


def params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[1], (3,))},
    "head": {"kernel": jax.random.normal(k[2], (3, 2))},
  }


def like(value, tree=None):
  return jax.tree.map(lambda p: jnp.full(p.shape, value, jnp.float32), tree or params())


def grads(seed=1):
  leaves, treedef = jax.tree.flatten(params())
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def poke(tree, value, leaf=("dense", "kernel"), index=(0, 0)):
  """``tree`` with one entry set to ``value``."""
  tree = jax.tree.map(jnp.asarray, tree)
  sub = tree
  for k in leaf[:-1]:
    sub = sub[k]
  sub[leaf[-1]] = sub[leaf[-1]].at[index].set(value)
  return tree


def logits_fn(p, x):
  return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["head"]["kernel"]


def tapped(p, x, taps):
  h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"] + taps["dense"])
  return h @ p["head"]["kernel"], {"dense": x}


def xs_ys(n_batches=2, n=5):
  x = jax.random.normal(jax.random.key(3), (n_batches, n, 4))
  return Batches(x, jnp.zeros((n_batches, n), jnp.int32))


def kron(a=None, g=None):
  """A Kronecker precision for ``dense``, and the diagonal one of ``head`` (outside the layer)."""
  a = jnp.eye(5) if a is None else a
  g = jnp.eye(3) if g is None else g
  return {"dense": KronFactors(a, g), "head": {"kernel": jnp.ones((3, 2))}}


KFAC = dict(precision="kfac", layers=("dense",))


def consolidated(tx, **signals):
  p = params()
  return cl_optax.consolidate(tx.init(p), p, **signals)


def update(tx, g, state=None, **extra):
  p = params()
  state = tx.init(p) if state is None else state
  return tx.update(g, state, p, **extra)[0]


# ------------------------------------------------------------------ checks
def finite_entries_finite_nonfinite_unchanged(g):
  """The non-finite entries of ``g`` pass unchanged; no NaN appears elsewhere."""

  def check(out):
    for o, i in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
      bad = ~np.isfinite(np.asarray(i))
      np.testing.assert_array_equal(np.asarray(o)[bad], np.asarray(i)[bad])
      assert np.all(np.isfinite(np.asarray(o)[~bad]))

  return check


def all_unchanged(g):
  def check(out):
    chex.assert_trees_all_equal(out, g)

  return check


def equal_to(want):
  def check(out):
    chex.assert_trees_all_equal(out, want)

  return check


def all_finite(out):
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out)), out


class Fault(NamedTuple):
  id: str
  run: Callable[[], Any]
  error: type | None = ValueError
  match: str | None = None
  check: Callable[[Any], None] | None = None


def raises(id, run, match, error=ValueError):
  return Fault(id, run, error, match)


def passes(id, run, check):
  return Fault(id, run, None, None, check)


def lora_params():
  """``params()`` with a LoRA branch (2 slots) on ``dense`` (cl_optax.adapters' layout)."""
  return {**params(), "q": cl_optax.adapters.lora_init(jax.random.key(4), 4, 3, rank=2, slots=2)}


def lora_grads(value=1.0, where=None):
  g = like(value, lora_params())
  return g if where is None else poke(g, where, ("q", "lora_b"), (0, 1))


def lora_consolidated(tx, state=None, **signals):
  p = lora_params()
  return cl_optax.consolidate(tx.init(p) if state is None else state, p, **signals)


C4 = {"q": jnp.eye(4)}

G_NAN = poke(grads(), NAN)
G_INF = poke(grads(), -INF, ("head", "kernel"), (1, 1))
G_EXTRA = {**grads(), "extra": jnp.ones(2)}
G_SHAPE = {**grads(), "head": {"kernel": jnp.ones((2, 3))}}

FAULTS = [
  # ---------------------------------------------------- factory arguments
  raises("ncl(data_size=0)", lambda: cl_optax.ncl(0.0), r"data_size.*0"),
  raises("ncl(data_size=-1)", lambda: cl_optax.ncl(-1.0), r"data_size"),
  raises("ncl(data_size=inf)", lambda: cl_optax.ncl(INF), r"data_size"),
  raises("ncl(strength=-1)", lambda: cl_optax.ncl(1.0, strength=-1.0), r"strength"),
  raises("ncl(damping=-1)", lambda: cl_optax.ncl(1.0, damping=-1.0), r"damping"),
  raises("ncl(decay=2)", lambda: cl_optax.ncl(1.0, decay=2.0), r"decay"),
  raises("ncl(radius=0)", lambda: cl_optax.ncl(1.0, radius=0.0), r"radius"),
  raises("si(xi=-1)", lambda: cl_optax.si(1.0, xi=-1.0), r"si: .*xi.*-1"),
  raises("si(strength=nan)", lambda: cl_optax.si(NAN), r"strength"),
  raises("task_free(every=0)", lambda: cl_optax.task_free(cl_optax.ewc(), every=0), r"every"),
  raises(
    "task_free.update(no importance)",
    lambda: update(cl_optax.task_free(cl_optax.ewc(), every=2, signals=["importance"]), grads()),
    r"task_free: .*importance",
  ),
  raises("rwalk(strength=-1)", lambda: cl_optax.rwalk(-1.0), r"rwalk: .*strength.*-1"),
  raises("rwalk(alpha=2)", lambda: cl_optax.rwalk(alpha=2.0), r"rwalk: .*alpha"),
  raises("rwalk(xi=0)", lambda: cl_optax.rwalk(xi=0.0), r"rwalk: .*xi"),
  raises("rwalk(every=1.5)", lambda: cl_optax.rwalk(every=1.5), r"rwalk: .*every"),  # type: ignore[arg-type]
  raises("freeze(threshold=-1)", lambda: cl_optax.freeze(threshold=-1.0), r"threshold.*-1"),
  raises("freeze(threshold=2)", lambda: cl_optax.freeze(threshold=2.0), r"threshold"),
  raises("online_ewc(decay=5)", lambda: cl_optax.online_ewc(1.0, decay=5.0), r"decay.*5"),
  raises("online_ewc(decay=-1)", lambda: cl_optax.online_ewc(1.0, decay=-1.0), r"decay"),
  raises("ewc(strength=-1)", lambda: cl_optax.ewc(-1.0), r"strength.*-1"),
  raises("mas(strength=-1)", lambda: cl_optax.mas(-1.0), r"strength"),
  raises("gem(strength=-1)", lambda: cl_optax.gem(-1.0), r"strength.*-1"),
  raises("gem(max_tasks=0)", lambda: cl_optax.gem(max_tasks=0), r"max_tasks"),
  raises("ogd(0)", lambda: cl_optax.ogd(0), r"max_directions.*0"),
  raises("ogd(rtol=-1)", lambda: cl_optax.ogd(4, rtol=-1.0), r"rtol"),
  raises("ogd(block_size=0)", lambda: cl_optax.ogd(4, block_size=0), r"block_size.*0"),
  raises("gpm(threshold=1.5)", lambda: cl_optax.gpm(1.5), r"threshold.*1.5"),
  raises("sgp(alpha=0)", lambda: cl_optax.sgp(alpha=0.0), r"sgp: .*alpha"),
  raises("sgp(threshold=-1)", lambda: cl_optax.sgp(-1.0), r"sgp: .*threshold"),
  raises("nscl(a=0.5)", lambda: cl_optax.nscl(0.5), r"nscl: .*a"),
  raises("trgp(eps=-1)", lambda: cl_optax.trgp(max_tasks=2, eps=-1.0), r"trgp: .*eps"),
  raises("trgp(max_tasks=0)", lambda: cl_optax.trgp(max_tasks=0), r"trgp: max_tasks"),
  raises("ncl(precision='full')", lambda: cl_optax.ncl(1.0, precision="full"), r"'diag' or 'kfac'"),
  # plasticity
  raises("l2_init(strength=-1)", lambda: cl_optax.l2_init(-1.0), r"l2_init: .*strength.*-1"),
  raises("l2_init(strength=nan)", lambda: cl_optax.l2_init(NAN), r"strength"),
  raises("shrink_perturb(shrink=-1)", lambda: cl_optax.shrink_perturb(-1.0), r"shrink.*-1"),
  raises("shrink_perturb(perturb=inf)", lambda: cl_optax.shrink_perturb(0.4, INF), r"perturb"),
  raises("param_noise(stddev=-1)", lambda: cl_optax.param_noise(-1.0), r"param_noise: .*stddev"),
  raises(
    "cbp_selector(decay_rate=1)", lambda: cl_optax.cbp_selector(decay_rate=1.0), r"decay_rate.*< 1"
  ),
  raises(
    "cbp_selector(replacement_rate=-1)", lambda: cl_optax.cbp_selector(-1.0), r"replacement_rate"
  ),
  raises(
    "cbp_selector(maturity_threshold=-1)",
    lambda: cl_optax.cbp_selector(maturity_threshold=-1),
    r"maturity_threshold",
  ),
  raises("cbp_selector(max_units=0)", lambda: cl_optax.cbp_selector(max_units=0), r"max_units"),
  raises(
    "continual_backprop(utility='weight')",
    lambda: cl_optax.continual_backprop(optax.sgd(1.0), layers=[], utility="weight"),
    r"utility.*'weight'",
  ),
  raises(
    "redo(threshold=-1)",
    lambda: cl_optax.redo(optax.sgd(1.0), layers=[], threshold=-1.0),
    r"redo: .*threshold",
  ),
  raises(
    "redo(every=0)", lambda: cl_optax.redo(optax.sgd(1.0), layers=[], every=0), r"redo: .*every"
  ),
  raises(
    "redo.init(missing layer path)",
    lambda: cl_optax.redo(optax.sgd(1.0), layers=[("dense/kernel", None, "nope/kernel")]).init(
      params()
    ),
    r"layers\[0\].*nope/kernel",
  ),
  raises(
    "continual_backprop.init(next bias of the wrong width)",
    lambda: cl_optax.continual_backprop(
      optax.sgd(1.0), layers=[("dense/kernel", "dense/bias", "head/kernel", "dense/bias")]
    ).init(params()),
    r"next bias.*dense/bias.*\(2,\)",
  ),
  # isolation
  raises("hat(clamp=0)", lambda: cl_optax.hat(["dense"], clamp=0.0), r"hat: .*clamp"),
  raises(
    "hat(embeddings of another length)",
    lambda: cl_optax.hat(["dense", "head"], embeddings=["dense"]),
    r"hat: .*embeddings.*2",
  ),
  raises(
    "hat.init(a selector with no kernel)",
    lambda: cl_optax.hat(["nope"]).init(params()),
    r"hat: layers\[0\].*'nope'",
  ),
  raises(
    "hat.init(input width not a multiple)",
    lambda: cl_optax.hat(["a", "b"]).init(
      {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((2, 5))}}
    ),
    r"hat: kernel 'b/kernel' has 2 inputs.*3 units",
  ),
  raises(
    "packnet(owner_dtype=float32)",
    lambda: cl_optax.packnet(owner_dtype=jnp.float32),
    r"packnet: .*owner_dtype",
  ),
  raises("packnet_share(task=T)", lambda: cl_optax.packnet_share(4, 4), r"packnet_share.*task"),
  raises("wsn_mask(keep=1.5)", lambda: cl_optax.wsn_mask(jnp.ones(4), 1.5), r"wsn_mask.*keep"),
  # ------------------------------------------------------------- adapters
  raises("olora(orthogonality=-1)", lambda: cl_optax.olora(optax.sgd(1.0), -1.0), r"olora.*-1"),
  raises("olora(norm=nan)", lambda: cl_optax.olora(optax.sgd(1.0), norm=NAN), r"olora.*norm"),
  raises("olora(form='l2')", lambda: cl_optax.olora(optax.sgd(1.0), form="l2"), r"form.*'l2'"),
  raises(
    "inflora(threshold_begin=1.5)",
    lambda: cl_optax.inflora(optax.sgd(1.0), 1.5),
    r"inflora.*threshold_begin.*1.5",
  ),
  raises(
    "inflora(threshold_end=-1)",
    lambda: cl_optax.inflora(optax.sgd(1.0), 0.9, -1.0),
    r"inflora.*threshold_end",
  ),
  raises(
    "olora_orthogonality(form='abs')",
    lambda: cl_optax.adapters.olora_orthogonality(lora_params(), "abs"),
    r"form.*'abs'",
  ),
  raises(
    "olora.init(branch without lora_slots_b)",
    lambda: cl_optax.olora(optax.sgd(1.0)).init(
      {"q": {k: v for k, v in lora_params()["q"].items() if k != "lora_slots_b"}}
    ),
    r"olora.*'q'.*lora_slots_b",
  ),
  raises(
    "inflora.init(slots of another rank)",
    lambda: cl_optax.inflora(optax.sgd(1.0)).init(
      {"q": {**lora_params()["q"], "lora_slots_a": jnp.zeros((2, 4, 3))}}
    ),
    r"inflora.*'q'.*lora_slots_a \(2, 4, 3\)",
  ),
  *[
    raises(
      f"{n}.update(extra leaf)",
      lambda tx=tx: tx.update(
        {**lora_grads(), "x": jnp.ones(2)}, tx.init(lora_params()), lora_params()
      ),
      r"update",
    )
    for n, tx in [
      ("olora", cl_optax.olora(optax.sgd(1.0))),
      ("inflora", cl_optax.inflora(optax.sgd(1.0))),
    ]
  ],
  *[
    raises(
      f"{n}.update(no params)",
      lambda tx=tx: tx.update(lora_grads(), tx.init(lora_params())),
      rf"{n}: update needs `params`",
    )
    for n, tx in [
      ("olora", cl_optax.olora(optax.sgd(1.0))),
      ("inflora", cl_optax.inflora(optax.sgd(1.0))),
    ]
  ],
  *[
    passes(
      f"{n}.update({k} gradient)",
      lambda tx=tx, g=lora_grads(0.5, v): tx.update(g, tx.init(lora_params()), lora_params())[0],
      lambda out, v=v: np.testing.assert_array_equal(np.asarray(out["q"]["lora_b"])[0, 1], -v),
    )
    for n, tx in [
      ("olora", cl_optax.olora(optax.sgd(1.0))),
      ("inflora", cl_optax.inflora(optax.sgd(1.0))),
    ]
    for k, v in (("nan", NAN), ("inf", INF))
  ],
  raises(
    "olora.consolidate(all slots taken)",
    lambda: lora_consolidated(
      cl_optax.olora(optax.sgd(1.0)),
      lora_consolidated(
        cl_optax.olora(optax.sgd(1.0)), lora_consolidated(cl_optax.olora(optax.sgd(1.0)))
      ),
    ),
    r"olora: all 2 adapter slots are taken",
  ),
  raises(
    "inflora.consolidate(no next_covariance)",
    lambda: lora_consolidated(cl_optax.inflora(optax.sgd(1.0))),
    r"inflora.*needs the signal `next_covariance=`",
  ),
  raises(
    "inflora.consolidate(no covariance after a task)",
    lambda: lora_consolidated(
      cl_optax.inflora(optax.sgd(1.0)),
      lora_consolidated(cl_optax.inflora(optax.sgd(1.0)), next_covariance=C4),
      next_covariance=C4,
    ),
    r"inflora.*needs the signal `covariance=`",
  ),
  raises(
    "inflora.consolidate(next_covariance nan)",
    lambda: lora_consolidated(
      cl_optax.inflora(optax.sgd(1.0)), next_covariance={"q": jnp.eye(4).at[0, 1].set(NAN)}
    ),
    r"inflora.*next_covariance.*q",
  ),
  raises(
    "inflora.consolidate(next_covariance wrong shape)",
    lambda: lora_consolidated(cl_optax.inflora(optax.sgd(1.0)), next_covariance={"q": jnp.eye(3)}),
    r"inflora.*next_covariance.*'q'.*\(4, 4\)",
  ),
  raises(
    "inflora.consolidate(next_covariance missing a branch)",
    lambda: lora_consolidated(cl_optax.inflora(optax.sgd(1.0)), next_covariance={"k": jnp.eye(4)}),
    r"inflora.*next_covariance.*lacks the branches \['q'\]",
  ),
  raises(
    "inflora.consolidate(next_covariance an array)",
    lambda: lora_consolidated(cl_optax.inflora(optax.sgd(1.0)), next_covariance=jnp.eye(4)),
    r"inflora.*next_covariance.*dict keyed by branch path",
  ),
  # ------------------------------------------------ update: trees, shapes, dtypes
  *[
    raises(f"{n}.update(extra leaf)", lambda tx=tx, e=e: update(tx(), G_EXTRA, **e), r"update")
    for n, tx, e in [
      ("soft_mask", cl_optax.soft_mask, {}),
      ("freeze", cl_optax.freeze, {}),
      ("ewc", cl_optax.ewc, {}),
      ("si", cl_optax.si, {}),
      ("rwalk", cl_optax.rwalk, {}),
      ("ncl", lambda: cl_optax.ncl(1.0), {}),
      ("ogd", lambda: cl_optax.ogd(2), {}),
      ("gpm", cl_optax.gpm, {}),
      ("sgp", cl_optax.sgp, {}),
      ("nscl", cl_optax.nscl, {}),
      ("trgp", lambda: cl_optax.trgp(max_tasks=2), {}),
      ("packnet", cl_optax.packnet, {}),
      ("agem", cl_optax.agem, {"ref_grads": grads(2)}),
    ]
  ],
  *[
    raises(f"{n}.update(wrong shape)", lambda tx=tx: update(tx(), G_SHAPE), r"head.*kernel")
    for n, tx in [
      ("soft_mask", cl_optax.soft_mask),
      ("ewc", cl_optax.ewc),
      ("ncl", lambda: cl_optax.ncl(1.0)),
      ("gpm", cl_optax.gpm),
      ("sgp", cl_optax.sgp),
      ("nscl", cl_optax.nscl),
      ("trgp", lambda: cl_optax.trgp(max_tasks=2)),
    ]
  ],
  raises(
    "agem.update(ref_grads wrong tree)",
    lambda: update(cl_optax.agem(), grads(), ref_grads={"dense": grads()["dense"]}),
    r"agem.*ref_grads",
  ),
  raises(
    "gem.update(task_grads without the task axis)",
    lambda: update(cl_optax.gem(max_tasks=2), grads(), task_grads=grads()),
    r"gem.*task_grads",
  ),
  passes(
    "ewc.update(bfloat16 grads)",
    lambda: update(cl_optax.ewc(), jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads())),
    lambda out: chex.assert_trees_all_equal_dtypes(
      out, jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads())
    ),
  ),
  # ---------------------------------------- update: non-finite gradients pass through
  *[
    passes(f"{n}.update({k} gradient)", lambda tx=tx, g=g: update(tx(), g), check(g))
    for n, tx, check in [
      ("soft_mask", cl_optax.soft_mask, finite_entries_finite_nonfinite_unchanged),
      ("freeze", cl_optax.freeze, finite_entries_finite_nonfinite_unchanged),
      ("ewc", cl_optax.ewc, finite_entries_finite_nonfinite_unchanged),
      ("online_ewc", cl_optax.online_ewc, finite_entries_finite_nonfinite_unchanged),
      ("mas", cl_optax.mas, finite_entries_finite_nonfinite_unchanged),
      ("si", cl_optax.si, finite_entries_finite_nonfinite_unchanged),
      ("rwalk", cl_optax.rwalk, finite_entries_finite_nonfinite_unchanged),
      ("ncl_diag", lambda: cl_optax.ncl(1.0), finite_entries_finite_nonfinite_unchanged),
      ("ogd", lambda: cl_optax.ogd(2), all_unchanged),
      ("l2_init", lambda: cl_optax.l2_init(1.0), finite_entries_finite_nonfinite_unchanged),
      ("shrink_perturb", cl_optax.shrink_perturb, all_unchanged),
      ("param_noise", lambda: cl_optax.param_noise(0.1), finite_entries_finite_nonfinite_unchanged),
      ("hat", lambda: cl_optax.hat(["dense", "head"]), finite_entries_finite_nonfinite_unchanged),
      ("packnet", cl_optax.packnet, finite_entries_finite_nonfinite_unchanged),
    ]
    for k, g in (("nan", G_NAN), ("inf", G_INF))
  ],
  passes(
    "agem.update(nan gradient)",
    lambda: update(cl_optax.agem(), G_NAN, ref_grads=like(-1.0)),
    all_unchanged(G_NAN),
  ),
  passes(
    "agem.update(nan ref_grads)",
    lambda: update(cl_optax.agem(), grads(), ref_grads=poke(like(-1.0), NAN)),
    all_unchanged(grads()),
  ),
  passes(
    "agem.update(zero ref_grads)",
    lambda: update(cl_optax.agem(), grads(), ref_grads=like(0.0)),
    equal_to(grads()),
  ),
  passes(
    "gem.update(nan task_grads)",
    lambda: update(
      cl_optax.gem(max_tasks=2),
      grads(),
      task_grads=jax.tree.map(lambda g: jnp.stack([g, -g]), poke(grads(3), NAN)),
    ),
    all_unchanged(grads()),
  ),
  # --------------------------------------- consolidate: signals (trees, values)
  raises(
    "ewc.consolidate(importance missing a leaf)",
    lambda: consolidated(cl_optax.ewc(), importance={"dense": like(1.0)["dense"]}),
    r"ewc.*importance.*head",
  ),
  raises(
    "online_ewc.consolidate(importance extra leaf)",
    lambda: consolidated(cl_optax.online_ewc(), importance={**like(1.0), "x": jnp.ones(1)}),
    r"online_ewc.*importance",
  ),
  raises(
    "mas.consolidate(importance wrong shape)",
    lambda: consolidated(cl_optax.mas(), importance={**like(1.0), "head": {"kernel": jnp.ones(2)}}),
    r"mas.*importance.*head.*kernel",
  ),
  raises(
    "ewc.consolidate(importance as a list)",
    lambda: consolidated(cl_optax.ewc(), importance=jax.tree.leaves(like(1.0))),
    r"ewc.*importance",
  ),
  *[
    raises(
      f"{n}.consolidate(importance {k})",
      lambda tx=tx, v=v: consolidated(tx(), importance=poke(like(0.5), v)),
      r"importance.*dense.*kernel",
    )
    for n, tx in [
      ("ewc", cl_optax.ewc),
      ("online_ewc", cl_optax.online_ewc),
      ("mas", cl_optax.mas),
      ("soft_mask", cl_optax.soft_mask),
      ("freeze", cl_optax.freeze),
    ]
    for k, v in (("nan", NAN), ("inf", INF), ("negative", -1.0))
  ],
  raises(
    "soft_mask.consolidate(importance > 1)",
    lambda: consolidated(cl_optax.soft_mask(), importance=poke(like(0.5), 1.5)),
    r"soft_mask.*importance.*\[0, 1\]",
  ),
  raises(
    "hat.consolidate(no gates)",
    lambda: consolidated(cl_optax.hat(["dense", "head"])),
    r"hat.*needs the signal `gates=`",
  ),
  raises(
    "hat.consolidate(gates > 1)",
    lambda: consolidated(cl_optax.hat(["dense", "head"]), gates=[jnp.full(3, 1.5), jnp.ones(2)]),
    r"hat.*gates.*\[0, 1\]",
  ),
  raises(
    "hat.consolidate(one gate vector for two layers)",
    lambda: consolidated(cl_optax.hat(["dense", "head"]), gates=[jnp.ones(3)]),
    r"hat.*gates",
  ),
  raises(
    "hat.consolidate(gates of the wrong width)",
    lambda: consolidated(cl_optax.hat(["dense", "head"]), gates=[jnp.ones(3), jnp.ones(3)]),
    r"hat.*gates",
  ),
  raises(
    "packnet.consolidate(no prune)",
    lambda: consolidated(cl_optax.packnet()),
    r"packnet.*needs the signal `prune=`",
  ),
  raises(
    "packnet.consolidate(prune=1.5)",
    lambda: consolidated(cl_optax.packnet(), prune=1.5),
    r"packnet: .*prune.*1.5",
  ),
  raises(
    "packnet.consolidate(prune=nan)",
    lambda: consolidated(cl_optax.packnet(), prune=NAN),
    r"packnet: .*prune",
  ),
  raises(
    "packnet.update(no params)",
    lambda: cl_optax.packnet().update(grads(), cl_optax.packnet().init(params())),
    r"packnet: update needs `params`",
  ),
  raises(
    "shrink_perturb.consolidate(no fresh)",
    lambda: consolidated(cl_optax.shrink_perturb()),
    r"shrink_perturb.*needs the signal `fresh=`",
  ),
  raises(
    "shrink_perturb.consolidate(fresh nan)",
    lambda: consolidated(cl_optax.shrink_perturb(), fresh=poke(like(0.5), NAN)),
    r"shrink_perturb.*fresh.*dense.*kernel",
  ),
  raises(
    "shrink_perturb.consolidate(fresh missing a leaf)",
    lambda: consolidated(cl_optax.shrink_perturb(), fresh={"dense": like(1.0)["dense"]}),
    r"shrink_perturb.*fresh",
  ),
  raises(
    "soft_mask.consolidate(no importance)",
    lambda: consolidated(cl_optax.soft_mask()),
    r"soft_mask.*importance",
  ),
  raises(
    "ncl.consolidate(precision nan)",
    lambda: consolidated(cl_optax.ncl(1.0), precision=poke(like(1.0), NAN)),
    r"ncl.*precision.*dense.*kernel",
  ),
  raises(
    "ncl_kfac.consolidate(non-symmetric factor)",
    lambda: consolidated(cl_optax.ncl(1.0, **KFAC), precision=kron(jnp.triu(jnp.ones((5, 5))))),
    r"ncl.*dense.*symmetric",
  ),
  raises(
    "ncl_kfac.consolidate(nan factor)",
    lambda: consolidated(cl_optax.ncl(1.0, **KFAC), precision=kron(g=jnp.eye(3).at[1, 1].set(NAN))),
    r"ncl.*dense.*non-finite",
  ),
  raises(
    "ncl_kfac.consolidate(negative-definite factor)",
    lambda: consolidated(cl_optax.ncl(1.0, **KFAC), precision=kron(a=-jnp.eye(5))),
    r"ncl.*dense.*positive semi-definite",
  ),
  raises(
    "ncl_kfac.consolidate(factor wrong shape)",
    lambda: consolidated(cl_optax.ncl(1.0, **KFAC), precision=kron(a=jnp.eye(4))),
    r"ncl.*dense.*\(5, 5\)",
  ),
  raises(
    "nscl.consolidate(no representations)",
    lambda: consolidated(cl_optax.nscl()),
    r"nscl.*representations",
  ),
  raises(
    "trgp.consolidate(no representations, no next_grads)",
    lambda: consolidated(cl_optax.trgp(max_tasks=2)),
    r"trgp.*representations.*next_grads",
  ),
  raises(
    "sgp.consolidate(no representations)",
    lambda: consolidated(cl_optax.sgp()),
    r"sgp.*representations",
  ),
  raises(
    "gpm.consolidate(nan representations)",
    lambda: consolidated(
      cl_optax.gpm(),
      representations={
        "dense": {"kernel": jnp.ones((3, 4)).at[0, 0].set(NAN)},
        "head": {"kernel": jnp.ones((3, 3))},
      },
    ),
    r"gpm.*representations.*dense.*kernel.*non-finite",
  ),
  raises(
    "ogd.consolidate(nan output_grads)",
    lambda: consolidated(
      cl_optax.ogd(4), output_grads=jax.tree.map(lambda g: g[None], poke(grads(), NAN))
    ),
    r"ogd.*output_grads.*non-finite",
  ),
  raises(
    "ogd.consolidate(output_grads without the sample axis)",
    lambda: consolidated(cl_optax.ogd(4), output_grads=grads()),
    r"ogd.*output_grads.*dense.*expected",
  ),
  # ---------------------------------------------------------- output_gradients
  raises(
    "output_gradients(labels of another length)",
    lambda: output_gradients(logits_fn, params(), jnp.ones((3, 4)), jnp.zeros(2, int)),
    r"output_gradients.*labels.*3",
  ),
  raises(
    "output_gradients(float labels)",
    lambda: output_gradients(logits_fn, params(), jnp.ones((3, 4)), jnp.zeros(3)),
    r"output_gradients.*labels.*integer",
  ),
  raises(
    "output_gradients(inputs without a sample axis)",
    lambda: output_gradients(logits_fn, params(), jnp.asarray(1.0)),
    r"output_gradients.*inputs",
  ),
  raises(
    "output_gradients(labels out of range)",
    lambda: output_gradients(logits_fn, params(), jnp.ones((3, 4)), jnp.full(3, 7)),
    r"output_gradients.*labels.*\[0, 2\)",
  ),
  # ---------------------------------------------------------------- estimators
  raises(
    "fisher_diag(stacked zero batches)",
    lambda: fisher_diag(logits_fn, params(), xs_ys(0)),
    r"fisher_diag.*batches.*empty",
  ),
  raises(
    "mas_sensitivity(stacked zero batches)",
    lambda: mas_sensitivity(logits_fn, params(), Batches(jnp.zeros((0, 5, 4)))),
    r"mas.*batches.*empty",
  ),
  raises(
    "kfac_factors(stacked zero batches)",
    lambda: kfac_factors(tapped, params(), xs_ys(0), layers=["dense"], key=jax.random.key(0)),
    r"kfac_factors.*batches.*empty",
  ),
  raises(
    "fisher_diag(batches of zero rows)",
    lambda: fisher_diag(logits_fn, params(), xs_ys(2, 0)),
    r"fisher_diag.*batches.*empty",
  ),
  raises(
    "fisher_diag(a list of pairs, not Batches)",
    lambda: fisher_diag(logits_fn, params(), [(jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))]),
    r"fisher_diag: `batches` is a list of 1 elements.*stack_batches",
  ),
  raises(
    "fisher_diag(fisher='true')",
    lambda: fisher_diag(logits_fn, params(), xs_ys(), fisher="true"),
    r"fisher_diag.*fisher",
  ),
  raises(
    "kfac_factors(sampled without key)",
    lambda: kfac_factors(tapped, params(), xs_ys(), layers=["dense"]),
    r"kfac_factors.*key",
  ),
  # -------------------------------------------------------------------- replay
  raises("replay.init(capacity=0)", lambda: replay.init(jnp.zeros(2), 0), r"capacity"),
  raises(
    "replay.add(wrong item shape)",
    lambda: replay.add(replay.init(jnp.zeros(2), 4), jnp.ones((3, 5)), key=jax.random.key(0)),
    r"replay.add.*shape",
  ),
  raises(
    "replay.add(reservoir without key)",
    lambda: replay.add(replay.init(jnp.zeros(2), 4), jnp.ones((3, 2))),
    r"replay.add.*key",
  ),
  raises(
    "replay.add(task out of range)",
    lambda: replay.add(replay.init(jnp.zeros(2), 4, num_tasks=2), jnp.ones((1, 2)), task=5),
    r"replay.add.*task 5",
  ),
  raises(
    "replay.sample(batch_size > capacity)",
    lambda: replay.sample(replay.init(jnp.zeros(2), 4), jax.random.key(0), 5),
    r"replay.sample.*batch_size",
  ),
  passes(
    "replay.add(nan items)",
    lambda: (
      replay.add(
        replay.init(jnp.zeros(2), 4), jnp.array([[NAN, 1.0], [INF, 2.0]]), key=jax.random.key(0)
      ).items
    ),
    lambda items: np.testing.assert_array_equal(
      np.asarray(items), [[NAN, 1.0], [INF, 2.0], [0, 0], [0, 0]]
    ),
  ),
  passes(
    "replay.add(zero rows)",
    lambda: replay.add(replay.init(jnp.zeros(2), 4), jnp.zeros((0, 2)), key=jax.random.key(0)),
    lambda m: (
      np.testing.assert_array_equal(m.items, np.zeros((4, 2))),
      np.testing.assert_array_equal(m.seen, 0),
    ),
  ),
  raises(
    "replay.init_balanced(num_classes=0)",
    lambda: replay.init_balanced(jnp.zeros(2), 4, 0),
    r"init_balanced.*num_classes",
  ),
  raises(
    "replay.add_balanced(label out of range)",
    lambda: replay.add_balanced(
      replay.init_balanced(jnp.zeros(2), 4, 3),
      jnp.ones((2, 2)),
      jnp.array([0, 3]),
      key=jax.random.key(0),
    ),
    r"add_balanced.*labels.*\[0, 3\)",
  ),
  raises(
    "replay.add_balanced(unknown rule)",
    lambda: replay.add_balanced(
      replay.init_balanced(jnp.zeros(2), 4, 3),
      jnp.ones((2, 2)),
      jnp.array([0, 1]),
      key=jax.random.key(0),
      rule="fifo",
    ),
    r"add_balanced.*rule",
  ),
  raises(
    "replay.add(class-balanced memory)",
    lambda: replay.add(
      replay.init_balanced(jnp.zeros(2), 4, 3), jnp.ones((1, 2)), key=jax.random.key(0)
    ),
    r"replay.add.*add_balanced",
  ),
  raises(
    "replay.sample(balanced on a reservoir)",
    lambda: replay.sample(replay.init(jnp.zeros(2), 4), jax.random.key(0), 2, balanced=True),
    r"replay.sample.*balanced",
  ),
  raises(
    "replay.herding_select(num > n)",
    lambda: replay.herding_select(jnp.ones((3, 2)), 4),
    r"herding_select.*num",
  ),
  passes(
    "replay.add_balanced(nan items)",
    lambda: replay.add_balanced(
      replay.init_balanced(jnp.zeros(2), 4, 2),
      jnp.array([[NAN, 1.0], [INF, 2.0]]),
      jnp.array([0, 1]),
      key=jax.random.key(0),
    ),
    lambda m: (
      np.testing.assert_array_equal(np.asarray(m.items)[:2], [[NAN, 1.0], [INF, 2.0]]),
      np.testing.assert_array_equal(m.class_count, [1, 1]),
    ),
  ),
  raises(
    "losses.icarl_bce(teacher without old_mask)",
    lambda: losses.icarl_bce(
      jnp.zeros((2, 3)), jnp.array([0, 1]), teacher_logits=jnp.zeros((2, 3))
    ),
    r"icarl_bce.*old_mask",
  ),
  raises(
    "losses.ace_cross_entropy(float labels)",
    lambda: losses.ace_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2), jnp.zeros(3, bool)),
    r"ace_cross_entropy.*integers",
  ),
  raises(
    "losses.xder_logit_update(shape mismatch)",
    lambda: losses.xder_logit_update(
      jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.array([0, 1]), jnp.ones(3, bool)
    ),
    r"xder_logit_update.*\[b, C\]",
  ),
  raises(
    "losses.supcon_loss(no views axis)",
    lambda: losses.supcon_loss(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)),
    r"supcon_loss.*\[items, views, dim\]",
  ),
  raises(
    "losses.supcon_loss(unknown reduction)",
    lambda: losses.supcon_loss(jnp.zeros((2, 2, 3)), jnp.zeros(2, jnp.int32), reduction="max"),
    r"supcon_loss.*'mean' or 'sum'.*'max'",
  ),
  raises(
    "losses.xder_consistency(C not a multiple of head_size)",
    lambda: losses.xder_consistency(
      jnp.zeros((2, 2, 5)), jnp.zeros(2, jnp.int32), jnp.ones(5, bool), head_size=2
    ),
    r"xder_consistency.*multiple of head_size 2",
  ),
  raises(
    "losses.xder_past_constraint(mask of another width)",
    lambda: losses.xder_past_constraint(jnp.zeros((2, 4)), jnp.ones(3, bool), jnp.ones(4, bool)),
    r"xder_past_constraint.*both masks \[C\].*\(3,\)",
  ),
  raises(
    "losses.xder_rewrite_select(eligible of another length)",
    lambda: losses.xder_rewrite_select(
      jnp.arange(3), jnp.ones(2, bool), jnp.zeros(5), jax.random.key(0)
    ),
    r"xder_rewrite_select.*\[b\].*\(3,\), \(2,\)",
  ),
  passes(
    "losses.supcon_loss(one view, a class alone: no positive, no nan)",
    lambda: losses.supcon_loss(jnp.ones((2, 1, 3)), jnp.array([0, 1])),
    lambda v: np.testing.assert_array_equal(np.asarray(v), 0.0),
  ),
  passes(
    "losses.ace_cross_entropy(nan logit of a masked class)",
    lambda: jax.grad(
      lambda z: losses.ace_cross_entropy(z, jnp.array([2]), jnp.array([True, True, False]))[0]
    )(jnp.array([[NAN, 0.0, 1.0]])),
    lambda g: np.testing.assert_array_equal(np.isfinite(np.asarray(g)), [[True, True, True]]),
  ),
  raises(
    "weight_align(unknown head path)",
    lambda: cl_optax.weight_align(
      params(), "head/kernel", old_classes=jnp.ones(3, bool), new_classes=jnp.ones(3, bool)
    ),
    r"weight_align.*head/kernel",
  ),
  # -------------------------------------------------------- streams, metrics
  raises(
    "streams.split(x and y of different lengths)",
    lambda: streams.split(np.zeros((10, 2)), np.zeros(9, int)),
    r"split.*10.*9|split.*9.*10",
  ),
  raises(
    "streams.permuted(n_tasks=0)",
    lambda: streams.permuted(np.zeros((10, 4)), np.zeros(10, int), n_tasks=0),
    r"permuted.*n_tasks",
  ),
  raises(
    "streams.split(float labels)",
    lambda: streams.split(np.zeros((10, 2)), np.linspace(0, 1, 10)),
    r"split.*integer",
  ),
  raises("metrics(non-square R)", lambda: M.average_accuracy(np.ones((2, 3))), r"square"),
  raises("metrics(nan in R)", lambda: M.backward_transfer([[NAN, 0], [0, 1]]), r"non-finite"),
  raises("metrics(empty R)", lambda: M.average_accuracy(np.zeros((0, 0))), r"at least 1"),
  raises("metrics(one task, BWT)", lambda: M.backward_transfer([[1.0]]), r"at least 2"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault):
  if fault.error is not None:
    with pytest.raises(fault.error, match=fault.match):
      fault.run()
  else:
    fault.check(fault.run())


def test_fault_ids_are_unique():
  ids = [f.id for f in FAULTS]
  assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


# ---------------------------------------------- si: a parameter that never moved
def test_si_with_xi_zero_gives_zero_importance_to_a_parameter_that_did_not_move():
  p = {"still": jnp.ones(3), "moving": jnp.ones(3)}
  tx = cl_optax.si(1.0, xi=0.0)
  state = tx.init(p)
  for _ in range(3):
    g = {"still": jnp.zeros(3), "moving": jnp.ones(3)}
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u))
  state = cl_optax.consolidate(state, p)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf))), state
  imp = [x for x in jax.tree.leaves(state) if np.shape(x) == (3,)]
  assert any(np.all(np.asarray(x) == 0) for x in imp)  # "still" gained no importance


# ------------------------------------------ after an error the state is unchanged
class StateFault(NamedTuple):
  id: str
  make: Callable[[], Any]
  bad: Callable[[Any, Any], Any]  # (tx, state) -> raises
  good: dict  # consolidate signals that work


def _bad_consolidate(**signals):
  return lambda tx, s: cl_optax.consolidate(s, params(), **signals)


def _bad_update(g, **extra):
  return lambda tx, s: tx.update(g, s, params(), **extra)


STATE_FAULTS = [
  StateFault(
    "ewc/nan importance",
    cl_optax.ewc,
    _bad_consolidate(importance=poke(like(1.0), NAN)),
    {"importance": like(1.0)},
  ),
  StateFault(
    "soft_mask/importance > 1",
    cl_optax.soft_mask,
    _bad_consolidate(importance=poke(like(0.5), 2.0)),
    {"importance": like(0.5)},
  ),
  StateFault(
    "mas/wrong tree",
    cl_optax.mas,
    _bad_consolidate(importance={"dense": like(1.0)["dense"]}),
    {"importance": like(1.0)},
  ),
  StateFault(
    "ncl_kfac/non-symmetric",
    lambda: cl_optax.ncl(1.0, **KFAC),
    _bad_consolidate(precision=kron(jnp.triu(jnp.ones((5, 5))))),
    {"precision": kron()},
  ),
  StateFault(
    "gpm/nan representations",
    cl_optax.gpm,
    _bad_consolidate(
      representations={
        "dense": {"kernel": jnp.full((3, 4), NAN)},
        "head": {"kernel": jnp.ones((3, 3))},
      }
    ),
    {
      "representations": {
        "dense": {"kernel": jnp.ones((3, 4))},
        "head": {"kernel": jnp.ones((3, 3))},
      }
    },
  ),
  StateFault(
    "ogd/nan output_grads",
    lambda: cl_optax.ogd(4),
    _bad_consolidate(output_grads=jax.tree.map(lambda g: g[None], poke(grads(), NAN))),
    {"output_grads": jax.tree.map(lambda g: g[None], grads())},
  ),
  StateFault(
    "hat/gates > 1",
    lambda: cl_optax.hat(["dense", "head"]),
    _bad_consolidate(gates=[jnp.full(3, 2.0), jnp.ones(2)]),
    {"gates": [jnp.full(3, 0.5), jnp.ones(2)]},
  ),
  StateFault(
    "packnet/prune=2",
    cl_optax.packnet,
    _bad_consolidate(prune=2.0),
    {"prune": 0.5, "finish": True},
  ),
  StateFault(
    "ewc/update extra leaf", cl_optax.ewc, _bad_update(G_EXTRA), {"importance": like(1.0)}
  ),
  StateFault("rwalk/update extra leaf", cl_optax.rwalk, _bad_update(G_EXTRA), {}),
]


@pytest.mark.parametrize("fault", STATE_FAULTS, ids=[f.id for f in STATE_FAULTS])
def test_state_is_unchanged_after_an_error_and_still_works(fault):
  tx = fault.make()
  p = params()
  state = cl_optax.consolidate(tx.init(p), p, **fault.good)
  before = jax.tree.map(np.array, state)
  with pytest.raises(ValueError):
    fault.bad(tx, state)
  chex.assert_trees_all_equal(state, before)
  state = cl_optax.consolidate(state, p, **fault.good)
  out, _ = tx.update(grads(), state, p)
  all_finite(out)


# ---------------------------------------------- checkpoint into a different tree
def test_restoring_a_checkpoint_into_a_different_tree_names_the_mismatch(tmp_path):
  p = params()
  saved = cl_optax.consolidate(cl_optax.soft_mask().init(p), p, importance=like(0.5))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", saved)
  with ocp.StandardCheckpointer() as ckpt:
    with pytest.raises(ValueError, match=r"do not match|mismatch"):
      ckpt.restore(tmp_path / "opt", target=cl_optax.ewc().init(p))
    with pytest.raises(ValueError, match=r"head|shape"):
      q = {**p, "head": {"kernel": jnp.ones((3, 5))}}
      ckpt.restore(tmp_path / "opt", target=cl_optax.soft_mask().init(q))
