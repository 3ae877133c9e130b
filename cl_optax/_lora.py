r"""LoRA branches with fixed-capacity slots: the pytree convention and its pure functions.

A *branch* is any node of a parameter tree (a dict, a Flax NNX module such as
``nnx.LoRA`` with two more params, an Equinox module) that holds four leaves
with these names, for a layer with inputs ``[..., d_in]`` and outputs
``[..., d_out]`` (Flax's ``[in, out]`` orientation, as ``nnx.LoRA``):

========================  ==================  ==================================
leaf                      shape               role
========================  ==================  ==================================
``lora_a``                ``[d_in, r]``       the current adapter's down-projection
``lora_b``                ``[r, d_out]``      the current adapter's up-projection
``lora_slots_a``          ``[S, d_in, r]``    the finished tasks' down-projections
``lora_slots_b``          ``[S, r, d_out]``   the finished tasks' up-projections
========================  ==================  ==================================

The branch adds :math:`s\,(x A B + \sum_{k<S} x A_k B_k)` to the layer's
output, with :math:`s = \alpha / r` (:func:`lora_apply`). ``S`` is a fixed
capacity: the slots of future tasks are zero and contribute nothing (to the
output, to O-LoRA's loss, to InfLoRA's design), so shapes never change across
tasks and nothing retraces. Task ``t``'s adapter goes into slot ``t`` at the
``t``-th boundary (:func:`lora_write_slot` for a user's own loop;
:func:`cl_optax.olora` and :func:`cl_optax.inflora` do it as a boundary write).
The branch's path is the path of its node, ``/``-joined (``"blocks/0/attn/k"``;
:func:`lora_branches` lists them).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cl_optax import _trees

ROLES = ("lora_a", "lora_b", "lora_slots_a", "lora_slots_b")


class Branch(NamedTuple):
  """Where a branch's four leaves sit in the flattened parameter tree."""

  path: str
  a: int
  b: int
  slots_a: int
  slots_b: int


def lora_init(
  key: jax.Array, d_in: int, d_out: int, rank: int, slots: int, dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
  r"""A fresh branch: ``lora_a`` Kaiming-uniform (PyTorch LoRA's ``a = sqrt(5)``, i.e.
  :math:`U(-1/\sqrt{d_{in}}, 1/\sqrt{d_{in}})`), ``lora_b`` and every slot zero.

  Example:
    >>> import jax, cl_optax
    >>> br = cl_optax.adapters.lora_init(jax.random.key(0), 4, 3, rank=2, slots=5)
    >>> {k: v.shape for k, v in br.items()}["lora_slots_a"]
    (5, 4, 2)
  """
  return {
    "lora_a": kaiming_a(key, (d_in, rank), dtype),
    "lora_b": jnp.zeros((rank, d_out), dtype),
    "lora_slots_a": jnp.zeros((slots, d_in, rank), dtype),
    "lora_slots_b": jnp.zeros((slots, rank, d_out), dtype),
  }


def kaiming_a(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` of a ``[r, d_in]`` weight, stored ``[d_in, r]``."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_apply(branch: Any, x: jax.Array, scale: float) -> jax.Array:
  r"""The branch's output :math:`s\,(x A B + \sum_k x A_k B_k)` for inputs ``x [..., d_in]``.

  Add it to the frozen base layer's output. ``branch`` maps the four role names
  to arrays (a dict, or an object with those attributes holding arrays or NNX
  variables).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> br = {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2)),
    ...       "lora_slots_a": jnp.ones((3, 2, 1)), "lora_slots_b": jnp.zeros((3, 1, 2))}
    >>> cl_optax.adapters.lora_apply(br, jnp.array([1.0, 2.0]), scale=0.5)
    Array([1.5, 1.5], dtype=float32)
  """
  a, b, sa, sb = (_role(branch, r) for r in ROLES)
  new = (x @ a) @ b
  old = jnp.einsum("...i,sir,sro->...o", x, sa, sb)
  return scale * (new + old)


def _role(branch: Any, role: str) -> jax.Array:
  x = branch[role] if isinstance(branch, dict) else getattr(branch, role)
  return x.get_value() if _trees.is_variable(x) else x


def lora_write_slot(branch: dict, slot: int | jax.Array, key: jax.Array | None = None) -> dict:
  """A branch with its current adapter copied into ``slot`` and a fresh one in its place.

  The functional form of the boundary write :func:`cl_optax.olora` emits:
  ``lora_slots_*[slot] <- lora_*``, then ``lora_a`` re-drawn with
  :func:`kaiming_a` from ``key`` (kept when ``key`` is None) and
  ``lora_b <- 0``. Jittable (``slot`` may be traced).
  """
  out = dict(branch)
  out["lora_slots_a"] = branch["lora_slots_a"].at[slot].set(branch["lora_a"])
  out["lora_slots_b"] = branch["lora_slots_b"].at[slot].set(branch["lora_b"])
  if key is not None:
    out["lora_a"] = kaiming_a(key, branch["lora_a"].shape, branch["lora_a"].dtype)
  out["lora_b"] = jnp.zeros_like(branch["lora_b"])
  return out


def input_covariance(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  r"""The input covariance :math:`C = \frac{1}{N} \sum_n x_n x_n^\top` over every token.

  ``x [..., d]`` are the adapted layer's inputs (InfLoRA: the attention block's
  input after its LayerNorm), every leading axis averaged (tokens and
  examples); ``mask [...]`` (bool or 0/1) keeps only some tokens (padding
  out). Sum several batches' ``C`` weighted by their token counts for a task's
  whole training set. Computed in float32.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> cl_optax.adapters.input_covariance(jnp.array([[[1.0, 0.0], [0.0, 2.0]]]))
    Array([[0.5, 0. ],
           [0. , 2. ]], dtype=float32)
  """
  d = x.shape[-1]
  flat = x.reshape(-1, d).astype(jnp.float32)
  w = jnp.ones(flat.shape[0]) if mask is None else jnp.reshape(mask, -1).astype(jnp.float32)
  return (flat * w[:, None]).T @ flat / jnp.maximum(jnp.sum(w), 1.0)


def find_branches(params: Any, *, transform: str) -> tuple[list[Branch], list[str]]:
  """The branches of ``params`` (leaf indices in flatten order) and every leaf's path.

  A leaf named like a role whose node lacks one of the other three, or whose
  shapes disagree, is a ``ValueError`` naming the node.
  """
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_trees.is_masked)[0]
  paths = [_trees.leaf_path(p) for p, _ in flat]
  nodes: dict[str, dict[str, int]] = {}
  for i, (path, (_, x)) in enumerate(zip(paths, flat, strict=True)):
    head, _, name = path.rpartition("/")
    if name in ROLES and not _trees.is_masked(x):
      nodes.setdefault(head, {})[name] = i
  out = []
  for head, roles in nodes.items():
    missing = [r for r in ROLES if r not in roles]
    if missing:
      raise ValueError(
        f"{transform}: the LoRA branch at {head!r} lacks the leaves {missing} "
        f"(a branch holds {list(ROLES)}; see cl_optax.adapters)."
      )
    _check_shapes(head, [flat[roles[r]][1] for r in ROLES], transform)
    out.append(Branch(head, *(roles[r] for r in ROLES)))
  return out, paths


def _check_shapes(head: str, leaves: list, transform: str) -> None:
  a, b, sa, sb = (tuple(jnp.shape(x)) for x in leaves)
  ok = len(a) == 2 and len(b) == 2 and a[1] == b[0]
  ok = ok and sa[1:] == a and sb[1:] == b and len(sa) == 3 and sa[0] == sb[0] > 0
  if not ok:
    raise ValueError(
      f"{transform}: the LoRA branch at {head!r} has shapes lora_a {a}, lora_b {b}, "
      f"lora_slots_a {sa}, lora_slots_b {sb}; expected [d_in, r], [r, d_out], "
      "[S, d_in, r], [S, r, d_out] with S >= 1."
    )


def lora_branches(params: Any) -> list[str]:
  """The paths of the LoRA branches in ``params`` (the keys of per-branch signals).

  Example:
    >>> import jax, cl_optax
    >>> params = {"attn": {"k": cl_optax.adapters.lora_init(jax.random.key(0), 4, 4, 2, 3)}}
    >>> cl_optax.adapters.lora_branches(params)
    ['attn/k']
  """
  return [b.path for b in find_branches(_trees.unwrap_variables(params), transform="adapters")[0]]


def olora_orthogonality(params: Any, form: str = "l1") -> jax.Array:
  r"""O-LoRA's orthogonality loss over every branch of ``params``.

  .. math::
    L_{orth} = \sum_{\text{branches}} \sum_{k<S} \sum_{j,l} \phi\big((A_k^\top A)_{jl}\big),
    \qquad \phi(z) = |z| \;(\texttt{"l1"}) \text{ or } z^2 \;(\texttt{"squared"})

  with :math:`A_k` the old slots' and :math:`A` the current down-projection
  (``[d_in, r]`` each). ``"l1"`` is what the official code computes
  (``uie_trainer_lora.py``: ``torch.abs(A_old @ A_new.T).sum()``, the default);
  ``"squared"`` is the paper's Eq. (squared entries). Empty slots add 0.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> br = {"lora_a": jnp.array([[1.0], [1.0]]), "lora_b": jnp.zeros((1, 2)),
    ...       "lora_slots_a": jnp.array([[[1.0], [-2.0]]]), "lora_slots_b": jnp.zeros((1, 1, 2))}
    >>> cl_optax.adapters.olora_orthogonality({"q": br})
    Array(1., dtype=float32)
  """
  if form not in ("l1", "squared"):
    raise ValueError(f"olora_orthogonality: form must be 'l1' or 'squared'; got {form!r}.")
  plain = _trees.unwrap_variables(params)
  branches, _ = find_branches(plain, transform="olora_orthogonality")
  leaves = jax.tree.leaves(plain, is_leaf=_trees.is_masked)
  total = jnp.zeros((), jnp.float32)
  for br in branches:
    total = total + orthogonality_term(leaves[br.slots_a], leaves[br.a], form)
  return total


def orthogonality_term(slots_a: jax.Array, a: jax.Array, form: str) -> jax.Array:
  """One branch's :math:`\\sum_k \\sum_{jl} \\phi((A_k^\\top A)_{jl})` in float32.

  A broadcast product summed over ``d_in`` (not a ``dot``): under explicit
  sharding a contraction over a sharded axis needs an output sharding, a sum
  does not (it reduces across devices; ``[S, r, r]`` is tiny).
  """
  o = jnp.sum(
    slots_a.astype(jnp.float32)[:, :, :, None] * a.astype(jnp.float32)[None, :, None, :], axis=1
  )
  return jnp.sum(jnp.abs(o)) if form == "l1" else jnp.sum(o * o)


def adapter_norm(params: Any) -> jax.Array:
  r"""O-LoRA's second term :math:`\sum_{\text{branches}} (\lVert A \rVert_F + \lVert B \rVert_F)`
  (unsquared Frobenius norms of the current adapters, as the official code)."""
  plain = _trees.unwrap_variables(params)
  branches, _ = find_branches(plain, transform="adapter_norm")
  leaves = jax.tree.leaves(plain, is_leaf=_trees.is_masked)
  total = jnp.zeros((), jnp.float32)
  for br in branches:
    for i in (br.a, br.b):
      total = total + safe_norm(leaves[i])
  return total


def safe_norm(x: jax.Array) -> jax.Array:
  """``||x||_F`` in float32 with gradient 0 at ``x = 0`` (PyTorch's subgradient, not NaN)."""
  ss = jnp.sum(jnp.square(x.astype(jnp.float32)))
  return jnp.where(ss > 0, jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)
