r"""O-LoRA: orthogonal subspace learning for continual learning of language models."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _lora_slots, _trees, _writes
from cl_optax._lora import kaiming_a, orthogonality_term, safe_norm

_FORMS = ("l1", "squared")


class OLoRAState(NamedTuple):
  """State of :func:`olora`.

  Attributes:
    olora_inner_state: the wrapped optimiser's state.
    olora_write: the pending slot write (a ``PendingWrite`` on the branch
      leaves only; ``MaskedNode`` elsewhere).
    olora_key: raw ``uint32[2]`` key for re-drawing ``lora_a`` at boundaries.
    olora_tasks: the number of consolidates so far, the next slot (int32).
  """

  olora_inner_state: Any
  olora_write: _writes.PendingWrite
  olora_key: jax.Array  # shape=(2,), uint32
  olora_tasks: jax.Array  # shape=(), int32

  def consolidate(self, params: optax.Params, **signals: Any) -> OLoRAState:
    """Slot write: each branch's adapter into slot ``olora_tasks``, a fresh one in its place."""
    del signals
    branches, leaves = _lora_slots.boundary_view(self.olora_write, params, "olora")
    key, sub = jax.random.split(jax.random.wrap_key_data(self.olora_key))
    keys = jax.random.split(sub, max(len(branches), 1))
    new_a = [kaiming_a(k, jnp.shape(leaves[br.a])) for k, br in zip(keys, branches)]
    write = _lora_slots.slot_write(
      self.olora_write, leaves, branches, self.olora_tasks, new_a, jnp.asarray(True), "olora"
    )
    return self._replace(
      olora_write=write, olora_key=jax.random.key_data(key), olora_tasks=self.olora_tasks + 1
    )


def _branch_grads(a, slots_a, b, orthogonality, norm, form):
  """The gradients (of ``a``, ``b``) of one branch's penalty, lambda_1 L_orth + lambda_2 norms."""

  def loss(a, b):
    orth = orthogonality_term(slots_a, a, form)
    return orthogonality * orth + norm * (safe_norm(a) + safe_norm(b))

  return jax.grad(loss, argnums=(0, 1))(a, b)


def _add_penalty(updates, params, branches, orthogonality, norm, form):
  leaves, tdef = jax.tree.flatten(updates, is_leaf=_trees.is_masked)
  p = jax.tree.leaves(_trees.unwrap_variables(params), is_leaf=_trees.is_masked)
  for br in branches:
    ga, gb = _branch_grads(p[br.a], p[br.slots_a], p[br.b], orthogonality, norm, form)
    for i, g in ((br.a, ga), (br.b, gb)):
      u = leaves[i]
      leaves[i] = jnp.where(jnp.isfinite(u), u + g.astype(u.dtype), u)
  return tdef.unflatten(leaves)


def _off(*weights: Any) -> bool:
  """Whether every weight is a Python zero (not a traced hyper-parameter)."""
  return all(isinstance(w, int | float) and w == 0 for w in weights)


def olora(
  inner: optax.GradientTransformation,
  orthogonality: float = 0.5,
  norm: float = 0.0,
  *,
  form: str = "l1",
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""O-LoRA (Wang et al., 2023): new LoRA adapters orthogonal to the old ones.

  Wraps the whole optimiser ``inner`` (as :func:`cl_optax.unit_resets`) over
  parameters holding LoRA branches (the layout of :mod:`cl_optax.adapters`:
  ``lora_a``, ``lora_b``, ``lora_slots_a``, ``lora_slots_b``). Per step it
  adds the gradient of O-LoRA's penalty to the current adapter's gradient,
  keeps the old slots frozen and runs ``inner``:

  .. math::
    L = L_{task} + \lambda_1 \sum_{\text{branches}} \sum_{k<t} \sum_{j,l}
        \big|(A_k^\top A)_{jl}\big| + \lambda_2 \sum (\lVert A \rVert_F + \lVert B \rVert_F)

  (``form="l1"``, the official code's absolute values and the default;
  ``form="squared"``, the paper's squared entries). Freeze the base layers
  yourself (e.g. ``optax.partition`` or ``cl_optax.freeze``-style masks); the
  transform touches only branch leaves. :func:`cl_optax.consolidate` (no
  signal) writes each branch's adapter into slot ``t`` (the ``t``-th
  boundary), re-draws ``lora_a`` Kaiming-uniform (PyTorch's
  ``a = sqrt(5)``), sets ``lora_b = 0`` and resets ``inner``'s
  params-shaped moments of those entries on the next step, all through the
  library's boundary writes (:func:`cl_optax.apply_pending_writes` lands them
  at once). The slots are a fixed capacity ``S``: shapes never change; a
  boundary with all slots taken raises.

  Departures from the official code (cmnfriend/O-LoRA): old adapters live in
  preallocated zero slots instead of growing concatenations (same forward,
  same loss); a new task restarts ``inner``'s moments of the new adapter but
  keeps its step count (the official run starts a fresh AdamW); LoRA dropout
  is the model's business. The penalty's gradient is added to the update
  *before* ``inner`` (as a loss term would be), so a user who adds
  :func:`cl_optax.adapters.olora_orthogonality` to the loss passes
  ``orthogonality=0``.

  Args:
    inner: the optimiser of the adapter (e.g. ``optax.adam(1e-3)``).
    orthogonality: :math:`\lambda_1 \ge 0` (official 0.5).
    norm: :math:`\lambda_2 \ge 0` (official 0).
    form: ``"l1"`` (official code, default) or ``"squared"`` (paper).
    seed: the PRNG seed of the re-drawn ``lora_a``. Under
      ``optax.inject_hyperparams`` list ``inner``, ``form`` and ``seed`` in
      ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Wang et al., *Orthogonal Subspace Learning for Language Model Continual
    Learning*, EMNLP 2023 Findings (arXiv:2310.14152), Sec. 3; official code
    ``src/uie_trainer_lora.py`` (the loss), ``peft/utils/save_and_load.py``
    (the boundary concatenation).

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"q": cl_optax.adapters.lora_init(jax.random.key(0), 4, 4, rank=2, slots=3)}
    >>> tx = cl_optax.olora(optax.sgd(0.1), orthogonality=0.5)
    >>> state = cl_optax.consolidate(tx.init(params), params)  # task 0 ends
    >>> params, state = cl_optax.apply_pending_writes(params, state)
    >>> bool(jnp.all(params["q"]["lora_slots_a"][0] != 0)), float(params["q"]["lora_b"].sum())
    (True, 0.0)
    >>> float(cl_optax.adapters.olora_orthogonality(params)) > 0  # the term is live from task 1
    True
  """
  _checks.check_hyperparameter(orthogonality, transform="olora", name="orthogonality", low=0.0)
  _checks.check_hyperparameter(norm, transform="olora", name="norm", low=0.0)
  if form not in _FORMS:
    raise ValueError(f"olora: form must be one of {_FORMS}; got {form!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    branches, _ = _lora_slots.branch_layout(params, "olora")
    return OLoRAState(
      olora_inner_state=inner.init(params),
      olora_write=_lora_slots.init_write(params, branches),
      olora_key=jax.random.key_data(jax.random.key(seed)),
      olora_tasks=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args("olora", extra_args)
    if params is None:
      raise ValueError("olora: update needs `params` (the penalty and the writes read them).")
    branches, _ = _lora_slots.branch_layout(params, "olora")
    if not _off(orthogonality, norm):  # sequential LoRA (both 0) skips the penalty's pass
      updates = _add_penalty(updates, params, branches, orthogonality, norm, form)
    frozen = {i for br in branches for i in (br.slots_a, br.slots_b)}
    updates, inner_state, write = _lora_slots.wrapped_update(
      inner, updates, state.olora_inner_state, state.olora_write, params, frozen,
      _lora_slots.branch_indices(branches), "olora", **extra_args,
    )  # fmt: skip
    return updates, state._replace(olora_inner_state=inner_state, olora_write=write)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
