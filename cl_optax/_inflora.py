r"""InfLoRA: interference-free low-rank adaptation (Liang & Li, 2024)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _lora_slots, _trees, _writes
from cl_optax._gpm_project import grow_basis


class InfLoRAState(NamedTuple):
  r"""State of :func:`inflora`.

  Attributes:
    inflora_inner_state: the wrapped optimiser's state.
    inflora_write: the pending slot write and designed ``lora_a`` (a
      ``PendingWrite`` on the branch leaves only).
    inflora_basis: per branch path, an orthogonal ``[d_in, d_in]`` matrix whose
      first ``inflora_count`` columns span the old tasks' input space
      :math:`M` and whose other columns span its complement (``gpm``'s
      layout: DualGPM's "remove" and "retain" bases in one buffer).
    inflora_count: per branch path, the number of old-space columns (int32).
    inflora_tasks: boundaries so far (int32): the first designs task 0's
      adapter; boundary ``t >= 1`` stores task ``t - 1`` in slot ``t - 1``.
    inflora_thresholds: :math:`(\epsilon_b, \epsilon_e)` (float32 ``[2]``),
      refreshed from the factory arguments at every update.
  """

  inflora_inner_state: Any
  inflora_write: _writes.PendingWrite
  inflora_basis: dict
  inflora_count: dict
  inflora_tasks: jax.Array  # shape=(), int32
  inflora_thresholds: jax.Array  # shape=(2,), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> InfLoRAState:
    """Basis growth from ``covariance`` (the finished task), then the next adapter's design
    from ``next_covariance`` (a slot write of the finished adapter and the designed one)."""
    branches, leaves = _lora_slots.boundary_view(self.inflora_write, params, "inflora")
    paths = [br.path for br in branches]
    nxt = _covariances(signals, "next_covariance", paths, self.inflora_basis)
    done = self.inflora_tasks > 0
    cov = signals.get("covariance")
    if cov is None and _trees.is_concrete(done) and bool(done):
      _checks.require_signal(signals, "covariance", "inflora", _WHAT)
    cov = (
      _covariances(signals, "covariance", paths, self.inflora_basis) if cov is not None else None
    )
    cap = int(jnp.shape(leaves[branches[0].slots_a])[0]) if branches else 1
    t = jnp.maximum(self.inflora_tasks - 1, 0).astype(jnp.float32)
    eps_b, eps_e = self.inflora_thresholds[0], self.inflora_thresholds[1]
    eps = eps_b + (eps_e - eps_b) * t / cap
    basis, count, new_a = dict(self.inflora_basis), dict(self.inflora_count), []
    for br in branches:
      b, c = basis[br.path], count[br.path]
      if cov is not None:
        nb, nc = grow_basis(b, c, _root(cov[br.path]), eps)
        b, c = jnp.where(done, nb, b), jnp.where(done, nc, c)
      basis[br.path], count[br.path] = b, c
      new_a.append(_design(b, c, nxt[br.path], rank=int(jnp.shape(leaves[br.a])[1])))
    write = _lora_slots.slot_write(
      self.inflora_write, leaves, branches, self.inflora_tasks - 1, new_a, done, "inflora"
    )
    return self._replace(
      inflora_write=write, inflora_basis=basis, inflora_count=count,
      inflora_tasks=self.inflora_tasks + 1,
    )  # fmt: skip


_WHAT = (
  "a dict mapping each LoRA branch path (cl_optax.adapters.lora_branches) to the "
  "[d_in, d_in] covariance of that layer's inputs, cl_optax.adapters.input_covariance"
)


def _covariances(signals: dict, name: str, paths: list[str], basis: dict) -> dict:
  given = _checks.require_signal(signals, name, "inflora", _WHAT)
  if not isinstance(given, dict):
    raise ValueError(f"inflora: `{name}=` must be a dict keyed by branch path; {_WHAT}.")
  missing = [p for p in paths if p not in given]
  if missing:
    raise ValueError(f"inflora: `{name}=` lacks the branches {missing}; got {sorted(given)}.")
  out = {}
  for p in paths:
    c = jnp.asarray(given[p], jnp.float32)
    d = basis[p].shape[0]
    if c.shape != (d, d):
      raise ValueError(f"inflora: `{name}=` at {p!r} has shape {c.shape}; expected {(d, d)}.")
    _checks.check_finite(c, transform="inflora", name=name, leaf=p)
    out[p] = c
  return out


@jax.jit
def _root(cov: jax.Array) -> jax.Array:
  """``X [d, d]`` with ``X^T X = C``: GPM's growth on it sees ``C``'s energies."""
  w, v = jnp.linalg.eigh((cov + cov.T) / 2)
  return (v * jnp.sqrt(jnp.clip(w, 0.0))).T


@jax.jit(static_argnames="rank")
def _design(basis: jax.Array, count: jax.Array, cov: jax.Array, *, rank: int) -> jax.Array:
  r"""The designed down-projection: top-``rank`` left singular vectors of
  :math:`(I - M M^\top) C`, over :math:`\sqrt{3}` (``[d_in, rank]``)."""
  d = basis.shape[0]
  m = jnp.where(jnp.arange(d)[None, :] < count, basis.astype(jnp.float32), 0.0)
  u, _, _ = jnp.linalg.svd((jnp.eye(d) - m @ m.T) @ cov, full_matrices=False)
  return u[:, :rank] / math.sqrt(3.0)


def inflora(
  inner: optax.GradientTransformation,
  threshold_begin: float = 0.95,
  threshold_end: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""InfLoRA (Liang & Li, 2024): designed down-projections, only up-projections trained.

  Wraps the whole optimiser ``inner`` over parameters holding LoRA branches
  (:mod:`cl_optax.adapters`). Per step only ``lora_b`` moves: ``lora_a`` and
  the slots get zero updates. Before task :math:`t` the new branch's
  down-projection is designed in the new task's input space with the old
  tasks' input space :math:`M` removed:

  .. math::
    A_t = \tfrac{1}{\sqrt{3}}\, U_{:, :r}, \qquad
    U \Sigma V^\top = \mathrm{svd}\big((I - M M^\top) C_t\big),
    \qquad C_t = \tfrac{1}{N} \textstyle\sum x x^\top

  so that, with plain SGD, the outputs on old inputs (in :math:`M`) never
  change. After task :math:`t`, :math:`M` grows from the trained network's
  covariance with GPM's rule (Eq. 8-9) at
  :math:`\epsilon_t = \epsilon_b + (\epsilon_e - \epsilon_b)\, t / T`
  (``T`` the slot capacity). Boundaries go through
  :func:`cl_optax.consolidate`: before task 0 with
  ``next_covariance=`` only; between tasks with ``covariance=`` (task
  :math:`t`'s, for the growth) and ``next_covariance=`` (task
  :math:`t+1`'s, for the design). Each is a dict from branch path to
  ``[d_in, d_in]`` (:func:`cl_optax.adapters.input_covariance`; InfLoRA
  adapts the attention's k and v from the block's normalised input, one
  ``C`` for both). A boundary writes the finished adapter into slot ``t``, the
  designed ``A`` into ``lora_a``, 0 into ``lora_b`` and resets ``inner``'s
  moments of those entries, through the boundary writes.

  The basis is ``gpm``'s ``[d_in, d_in]`` orthogonal buffer (old space and
  complement in one), grown by ``gpm``'s code: DualGPM's switch between a
  "remove" and a "retain" basis is a choice of columns, never a label. That
  fixes the official code's first-task bug (a basis of the *old* space stored
  as "retain" when :math:`k \ge d/2`, so the next design keeps the old space).

  Departures from the official code (liangyanshuo/InfLoRA): the first task
  keeps the smallest ``k`` that reaches :math:`\epsilon_0` (as ``gpm``; the
  code keeps one fewer); later "retain" steps grow the old space by GPM's rule
  instead of dropping complement directions; one basis per branch (the code
  shares one per block between k and v: pass the same ``C``); ``inner``'s
  step count is kept at a boundary (the code builds a fresh optimiser).

  Args:
    inner: the optimiser of the up-projections (official: Adam 5e-4).
    threshold_begin: :math:`\epsilon_b \in [0, 1]` (official 0.95 CIFAR, 0.98 ImageNet-R).
    threshold_end: :math:`\epsilon_e \in [0, 1]` (official 1.0). Under
      ``optax.inject_hyperparams`` list ``inner`` in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Liang & Li, *InfLoRA: Interference-Free Low-Rank Adaptation for Continual
    Learning*, CVPR 2024 (arXiv:2404.00228), Eq. 8-12; official code
    ``methods/inflora.py`` (design, DualGPM), ``models/vit_inflora.py``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"k": cl_optax.adapters.lora_init(jax.random.key(0), 3, 2, rank=1, slots=2)}
    >>> tx = cl_optax.inflora(optax.sgd(0.1), 1.0, 1.0)
    >>> c0 = jnp.diag(jnp.array([4.0, 0.0, 0.0]))  # task 0 uses e1
    >>> state = cl_optax.consolidate(tx.init(params), params, next_covariance={"k": c0})
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> c1 = jnp.diag(jnp.array([1.0, 2.0, 0.0]))  # task 1: e1 and e2, e1 taken
    >>> state = cl_optax.consolidate(state, params, covariance={"k": c0}, next_covariance={"k": c1})
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> jnp.abs(params["k"]["lora_a"][:, 0]).round(3)  # e2 / sqrt(3)
    Array([0.   , 0.577, 0.   ], dtype=float32)
  """
  for name, v in (("threshold_begin", threshold_begin), ("threshold_end", threshold_end)):
    _checks.check_hyperparameter(v, transform="inflora", name=name, low=0.0, high=1.0)
  inner = optax.with_extra_args_support(inner)

  def thresholds():
    return jnp.asarray([threshold_begin, threshold_end], jnp.float32)

  def init_fn(params):
    branches, _ = _lora_slots.branch_layout(params, "inflora")
    leaves = jax.tree.leaves(_trees.unwrap_variables(params), is_leaf=_trees.is_masked)
    d = {br.path: int(jnp.shape(leaves[br.a])[0]) for br in branches}
    return InfLoRAState(
      inflora_inner_state=inner.init(params),
      inflora_write=_lora_slots.init_write(params, branches),
      inflora_basis={p: jnp.zeros((n, n), jnp.float32) for p, n in d.items()},
      inflora_count={p: jnp.zeros((), jnp.int32) for p in d},
      inflora_tasks=jnp.zeros((), jnp.int32),
      inflora_thresholds=thresholds(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args("inflora", extra_args)
    if params is None:
      raise ValueError("inflora: update needs `params` (the boundary writes land on them).")
    branches, _ = _lora_slots.branch_layout(params, "inflora")
    frozen = {i for br in branches for i in (br.a, br.slots_a, br.slots_b)}
    updates, inner_state, write = _lora_slots.wrapped_update(
      inner, updates, state.inflora_inner_state, state.inflora_write, params, frozen,
      _lora_slots.branch_indices(branches), "inflora", **extra_args,
    )  # fmt: skip
    new = state._replace(inflora_inner_state=inner_state, inflora_write=write)
    return updates, new._replace(inflora_thresholds=thresholds())

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
