r"""Gradient projection: A-GEM, GEM, OGD and GPM.

Each method changes the gradient so that a step does not (to first order)
increase the loss of earlier tasks:

* :func:`agem` and :func:`gem` read per-step memory gradients as extra args
  (``ref_grads=`` / ``task_grads=`` and ``task_mask=``) and keep
  :math:`\langle \tilde g, g_{mem} \rangle \ge 0`. Their memory lives outside the
  optimiser, in :mod:`cl_optax.replay`; the reference gradients are computed in
  the same jitted step (see ``examples/flax_agem.py`` and ``examples/flax_gem.py``).
* :func:`ogd` and :func:`gpm` keep orthonormal bases in their state, grown at
  :func:`cl_optax.consolidate` (``output_grads=`` / ``representations=``), and
  remove the gradient's component in their span.

All four keep fixed shapes (GEM: a fixed ``max_tasks`` leading axis and a
validity mask; OGD/GPM: fixed-capacity buffers with a count), so nothing
retraces across tasks. Dot products are global over the whole pytree and run
in float32 whatever the gradient dtype. Non-finite gradients pass through
unchanged. The guarantees hold for plain SGD on the projected gradient; put the
projection *before* the base optimiser (``chain(agem(), sgd(lr))``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _state

PyTree = Any
_f32 = jnp.float32


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _leaves(tree):
  return jax.tree.leaves(tree, is_leaf=_is_masked)


def _matching_leaves(updates, tree, *, transform: str, name: str, lead: tuple = ()):
  """Pairs of (update leaf, ``tree`` leaf), skipping ``MaskedNode`` updates.

  Raises a ``ValueError`` when ``tree`` does not have the updates' structure or
  a leaf's shape is not ``lead + update_shape``.
  """
  u_def = jax.tree.structure(updates, is_leaf=_is_masked)
  t_def = jax.tree.structure(tree, is_leaf=_is_masked)
  u_leaves = u_def.flatten_up_to(updates)
  if u_def != t_def:
    try:  # a full tree under optax.masked: drop the masked positions
      t_leaves = u_def.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{transform}: `{name}` must be a pytree like the updates; expected structure "
        f"{u_def}, got {t_def}."
      ) from e
  else:
    t_leaves = u_def.flatten_up_to(tree)
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(updates, is_leaf=_is_masked)
  ]
  pairs = []
  for path, u, t in zip(paths, u_leaves, t_leaves, strict=True):
    if _is_masked(u) or u is None:
      continue
    want = tuple(lead) + tuple(np.shape(u))
    if tuple(np.shape(t)) != want:
      raise ValueError(
        f"{transform}: `{name}` leaf {path} has shape {tuple(np.shape(t))}; expected {want}"
        f"{' (leading axis = max_tasks)' if lead else ''}."
      )
    pairs.append((u, t))
  return pairs


def _contract(a, b, axes):
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


def _sq_norm(leaves) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in leaves)


def _all_finite(leaves) -> jax.Array:
  ok = jnp.asarray(True)
  for x in leaves:
    ok = ok & jnp.all(jnp.isfinite(x))
  return ok


# ------------------------------------------------------------------ A-GEM


class AGEMState(NamedTuple):
  """State of :func:`agem`.

  Attributes:
    agem_projected: number of steps in which the constraint was violated and
      the gradient was projected (a diagnostic; int32).
  """

  agem_projected: jax.Array  # shape=(), int32

  def consolidate(self, params, **signals) -> AGEMState:
    """A-GEM keeps no task state: its memory is the user's replay buffer."""
    del params, signals
    return self


def agem() -> optax.GradientTransformationExtraArgs:
  r"""A-GEM: averaged gradient episodic memory (Chaudhry et al., 2019).

  With :math:`g_{ref}` the gradient of the loss on a batch drawn from the
  episodic memory of all past tasks (the extra arg ``ref_grads=``),

  .. math::
    \tilde g = g - \frac{g^\top g_{ref}}{g_{ref}^\top g_{ref}}\, g_{ref}
    \quad \text{if } g^\top g_{ref} < 0, \qquad \tilde g = g \text{ otherwise,}

  where the dot products run over the whole pytree (all leaves flattened into
  one vector, as in the official code). Without ``ref_grads`` (the first task),
  with a zero reference gradient or a non-finite gradient, the update passes
  through unchanged.

  Args: none (``ref_grads`` is a per-step extra arg).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``ref_grads=`` (a pytree like the updates, any float dtype).

  References:
    Chaudhry, Ranzato, Rohrbach, Elhoseiny, *Efficient Lifelong Learning with
    A-GEM*, ICLR 2019 (arXiv:1812.00420), Eq. 11; official code
    facebookresearch/agem (``model/model.py``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> tx = optax.chain(cl_optax.agem(), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g, g_ref = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-1.0, 0.0])}
    >>> updates, state = tx.update(g, state, params, ref_grads=g_ref)
    >>> updates["w"]  # -(g - (g.r / r.r) r) = -(0, 1)
    Array([-0., -1.], dtype=float32)
  """

  def init_fn(params):
    del params
    return AGEMState(agem_projected=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, ref_grads=None, **extra_args):
    del params, extra_args
    if ref_grads is None:
      return updates, state
    pairs = _matching_leaves(updates, ref_grads, transform="agem", name="ref_grads")
    if not pairs:
      return updates, state
    # Sums of products (not vdot, which ravels): XLA reduces them across
    # devices without gathering a sharded leaf.
    dot = sum(jnp.sum(u.astype(_f32) * r.astype(_f32)) for u, r in pairs)
    rr = sum(jnp.sum(jnp.square(r.astype(_f32))) for _, r in pairs)
    project = (dot < 0) & (rr > 0) & jnp.isfinite(dot) & jnp.isfinite(rr)
    coef = jnp.where(project, dot / jnp.where(rr > 0, rr, 1.0), 0.0)

    def leaf(u, r):
      if _is_masked(u) or u is None:
        return u
      return jnp.where(project, (u.astype(_f32) - coef * r.astype(_f32)).astype(u.dtype), u)

    ref = _restrict(updates, ref_grads)
    new = jax.tree.map(leaf, updates, ref, is_leaf=_is_masked)
    return new, AGEMState(state.agem_projected + project.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _restrict(updates, tree):
  """``tree`` cut to the updates' structure (``MaskedNode`` where they have one)."""
  u_def = jax.tree.structure(updates, is_leaf=_is_masked)
  leaves = u_def.flatten_up_to(tree)
  u_leaves = u_def.flatten_up_to(updates)
  return u_def.unflatten(
    [u if _is_masked(u) or u is None else t for u, t in zip(u_leaves, leaves, strict=True)]
  )


# -------------------------------------------------------------------- GEM


def solve_box_qp(
  P: jax.Array, c: jax.Array, lower: jax.Array, *, iterations: int | None = None
) -> jax.Array:
  r"""Solves :math:`\min_v \tfrac12 v^\top P v + c^\top v` s.t. :math:`v \ge` ``lower``.

  A primal active-set method with a fixed number of iterations, so it runs
  inside ``jit`` on any device. It starts with every bound active
  (``v = lower``, GEM's common case) and at each iteration either moves to the
  minimiser over the free coordinates (stopping at the first bound in the way,
  which becomes active) or, at that minimiser, frees the active bound with the
  most negative multiplier. Each step is a ``[k, k]`` Cholesky solve; the
  objective never increases and the iterate is always feasible. A problem
  whose solution has ``m`` coordinates off their bound takes about ``m``
  to ``2m`` iterations; the default, ``3 k + 5``, covers every bound moving. ``P`` must
  be symmetric positive definite (GEM adds ``eps * I``); it is rescaled to a
  unit diagonal (Jacobi) so rows of very different norms keep float32 accuracy.
  Checked against ``quadprog`` (float64) to 1e-5 relative on GEM's
  constraints :math:`\langle \tilde g, g_k \rangle` for 20 rows, including
  nearly collinear rows and row norms spread over :math:`e^{\pm 4}`
  (``cond(P)`` up to 1e10). Float32 loses that accuracy only when ``G`` is
  rank-deficient with very uneven row norms (more tasks than parameters),
  which GEM does not meet in practice.

  Args:
    P: ``[k, k]`` symmetric positive-definite matrix.
    c: ``[k]`` linear term.
    lower: ``[k]`` lower bounds.
    iterations: number of active-set iterations (static; ``3 k + 5`` if ``None``).

  Returns:
    ``v`` of shape ``[k]`` (float32), feasible (``v >= lower``).
  """
  P = jnp.asarray(P, _f32)
  c = jnp.asarray(c, _f32)
  lower = jnp.asarray(lower, _f32)
  # Jacobi scaling v = s * w with s = 1 / sqrt(diag(P)).
  d = jnp.diag(P)
  s = jnp.where((d > 0) & jnp.isfinite(d), jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 1.0)
  P = P * s[:, None] * s[None, :]
  c = c * s
  lo = lower / s
  k = c.shape[0]
  eye = jnp.eye(k, dtype=_f32)
  if iterations is None:
    iterations = 3 * k + 5

  def body(_, carry):
    w, active = carry
    free = ~active
    H = jnp.where(free[:, None] & free[None, :], P, 0.0) + eye * active[:, None]
    fixed = jnp.where(active, lo, 0.0)
    rhs = jnp.where(free, -c - P @ fixed, lo)
    factor = jax.scipy.linalg.cho_factor(H)
    target = jax.scipy.linalg.cho_solve(factor, rhs)
    target = target + jax.scipy.linalg.cho_solve(factor, rhs - H @ target)  # refinement
    step = target - w
    moving = jnp.max(jnp.abs(step)) > 1e-6 * (1.0 + jnp.max(jnp.abs(w)))
    # Move towards the free minimiser, stopping at the first blocking bound.
    ratio = jnp.where(free & (step < 0), (lo - w) / jnp.where(step < 0, step, -1.0), jnp.inf)
    alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    blocked = alpha < 1.0
    w_move = jnp.maximum(w + alpha * step, lo)
    block = jnp.argmin(ratio)
    active_move = active | (blocked & (jnp.arange(k) == block))
    # At the free minimiser: release the most negative multiplier, if any.
    lam = P @ target + c
    lam_active = jnp.where(active, lam, jnp.inf)
    release = jnp.argmin(lam_active)
    active_stay = active & ~((jnp.arange(k) == release) & (lam_active[release] < 0))
    w_new = jnp.where(moving, w_move, jnp.maximum(target, lo))
    active_new = jnp.where(moving, active_move, active_stay)
    ok = jnp.all(jnp.isfinite(w_new))
    return jnp.where(ok, w_new, w), jnp.where(ok, active_new, active)

  w, _ = jax.lax.fori_loop(0, iterations, body, (lo, jnp.ones((k,), jnp.bool_)))
  return jnp.maximum(w * s, lower)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _gem_dual(gram, dots, mask, memory_strength, eps, *, iterations):
  """Whether to project, and the dual solution ``v`` (0 on masked rows)."""
  k = dots.shape[0]
  both = mask[:, None] & mask[None, :]
  gram = jnp.where(both, 0.5 * (gram + gram.T), 0.0)
  dots = jnp.where(mask, dots, 0.0)
  finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(dots))
  project = jnp.any(mask & (dots < 0)) & finite

  def solve(_):
    # Masked rows: a decoupled unit diagonal, so their v is 0 at the optimum.
    P = gram + jnp.diag(jnp.where(mask, jnp.asarray(eps, _f32), 1.0))
    lower = jnp.where(mask, jnp.asarray(memory_strength, _f32), 0.0)
    v = solve_box_qp(P, dots, lower, iterations=iterations)
    return jnp.where(mask, v, 0.0)

  return project, jax.lax.cond(project, solve, lambda _: jnp.zeros((k,), _f32), None)


class GEMState(NamedTuple):
  """State of :func:`gem`.

  Attributes:
    gem_projected: number of steps in which some constraint was violated and
      the QP projection ran (a diagnostic; int32).
  """

  gem_projected: jax.Array  # shape=(), int32

  def consolidate(self, params, **signals) -> GEMState:
    """GEM keeps no task state: its memory is the user's replay buffer."""
    del params, signals
    return self


def gem(
  memory_strength: float = 0.5,
  *,
  max_tasks: int | None = None,
  eps: float = 1e-3,
  solver_iterations: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GEM: gradient episodic memory (Lopez-Paz & Ranzato, 2017).

  With :math:`G = [g_1, \dots, g_K]^\top` the gradients of the losses on the
  episodic memories of past tasks (extra arg ``task_grads=``, every leaf with
  a leading axis of size ``max_tasks``; rows where ``task_mask`` is ``False``
  are ignored), GEM projects :math:`g` onto the cone
  :math:`\{\tilde g : G \tilde g \ge 0\}` through the dual QP (paper Eq. 13)

  .. math::
    \min_{v \ge \gamma}\; \tfrac12 v^\top (G G^\top + \epsilon I) v + g^\top G^\top v,
    \qquad \tilde g = G^\top v^\star + g,

  set up as in the official code: :math:`P = G G^\top` symmetrised plus
  ``eps * I``, the lower bound :math:`\gamma` = ``memory_strength`` (0.5 in the
  paper's runs) in place of the paper's "add a small constant to :math:`v^\star`",
  and the projection only when some :math:`\langle g, g_k \rangle < 0`.
  The official code ships the gradients to the host and calls ``quadprog`` in
  float64; here the QP is solved inside ``jit`` in float32 by
  :func:`solve_box_qp` (fixed iterations; tested against ``quadprog``). With
  ``eps > 0`` the exact solution has :math:`\langle \tilde g, g_k \rangle
  = \lambda_k - \epsilon v_k \ge -\epsilon v_k`.

  Args:
    memory_strength: the lower bound :math:`\gamma \ge 0` on the dual variables.
    max_tasks: the expected leading axis of ``task_grads`` (checked when given;
      inferred otherwise).
    eps: ridge added to :math:`G G^\top` (official code: 1e-3).
    solver_iterations: iterations of the in-jit active-set QP solver
      (``3 * max_tasks + 5`` when ``None``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``task_grads=`` (leaves ``[max_tasks, *leaf.shape]``) and ``task_mask=``
    (bool ``[max_tasks]``, all rows valid when omitted; masked rows take no
    part in the QP but must hold finite numbers, e.g. zeros, as they are
    multiplied by 0). Without ``task_grads`` the update passes through
    unchanged.

  References:
    Lopez-Paz, Ranzato, *Gradient Episodic Memory for Continual Learning*,
    NeurIPS 2017 (arXiv:1706.08840), Eq. 10-13; official code
    facebookresearch/GradientEpisodicMemory (``model/gem.py``, ``project2cone2``).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> gem = cl_optax.gem(memory_strength=0.0, max_tasks=2, eps=0.0)
    >>> tx = optax.chain(gem, optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g = {"w": jnp.array([1.0, 1.0])}
    >>> task_grads = {"w": jnp.array([[-1.0, 0.0], [0.0, 0.0]])}
    >>> mask = jnp.array([True, False])
    >>> updates, _ = tx.update(g, state, params, task_grads=task_grads, task_mask=mask)
    >>> updates["w"]  # the projection of g onto {<g~, (-1, 0)> >= 0}, negated
    Array([-0., -1.], dtype=float32)
  """

  def init_fn(params):
    del params
    return GEMState(gem_projected=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, task_grads=None, task_mask=None, **extra_args):
    del params, extra_args
    if task_grads is None:
      return updates, state
    t_leaves = [t for t in _leaves(task_grads) if not _is_masked(t)]
    if not t_leaves:
      return updates, state
    k = max_tasks if max_tasks is not None else int(np.shape(t_leaves[0])[0])
    pairs = _matching_leaves(updates, task_grads, transform="gem", name="task_grads", lead=(k,))
    if not pairs:
      return updates, state
    if task_mask is None:
      mask = jnp.ones((k,), jnp.bool_)
    else:
      if tuple(np.shape(task_mask)) != (k,):
        raise ValueError(
          f"gem: `task_mask` has shape {tuple(np.shape(task_mask))}; expected ({k},) "
          "(one entry per row of task_grads)."
        )
      mask = jnp.asarray(task_mask).astype(jnp.bool_)

    gram = jnp.zeros((k, k), _f32)
    dots = jnp.zeros((k,), _f32)
    for u, t in pairs:  # contractions over the leaf's axes: no reshape of sharded leaves
      t32, rest = t.astype(_f32), list(range(1, t.ndim))
      gram = gram + _contract(t32, t32, (rest, rest))
      dots = dots + _contract(t32, u.astype(_f32), (rest, list(range(u.ndim))))
    project, v = _gem_dual(gram, dots, mask, memory_strength, eps, iterations=solver_iterations)

    def leaf(u, t):
      if _is_masked(u) or u is None:
        return u
      new = u.astype(_f32) + jnp.tensordot(v, t.astype(_f32), axes=1)
      return jnp.where(project, new.astype(u.dtype), u)

    new = jax.tree.map(leaf, updates, _restrict(updates, task_grads), is_leaf=_is_masked)
    return new, GEMState(state.gem_projected + project.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------- OGD


class OGDState(NamedTuple):
  """State of :func:`ogd`.

  Attributes:
    basis: orthonormal directions, a pytree like params whose leaves have a
      leading axis of size ``max_directions`` (rows past ``basis_count`` are 0).
    basis_count: number of directions stored (int32).
    basis_dropped: independent directions that did not fit in the buffer
      (int32; only a ``consolidate`` traced under ``jit`` can leave it > 0,
      an eager one raises instead).
    rtol: a candidate whose residual norm after Gram-Schmidt is below
      ``rtol`` times its norm is taken as already in the span and skipped.
  """

  basis: PyTree
  basis_count: jax.Array  # shape=(), int32
  basis_dropped: jax.Array  # shape=(), int32
  rtol: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> OGDState:
    """Adds the task's ``output_grads`` to the basis (Gram-Schmidt, twice)."""
    del params
    grads = _state.require_signal(
      signals,
      "output_grads",
      "ogd",
      "a pytree like params whose leaves have a leading axis of size n: the gradients "
      "of the model outputs at n stored samples, e.g. from cl_optax.output_gradients",
    )
    grads = _state.restrict_like(self.basis, grads, transform="ogd", name="output_grads")
    b_leaves = [b for b in _leaves(self.basis) if not _is_masked(b)]
    g_leaves = [g for g in _leaves(grads) if not _is_masked(g)]
    if not b_leaves:
      return self
    n = int(np.shape(g_leaves[0])[0]) if np.ndim(g_leaves[0]) else -1
    for path, b, g in zip(_paths(self.basis), b_leaves, g_leaves, strict=True):
      if np.shape(g)[1:] != np.shape(b)[1:] or np.ndim(g) == 0 or np.shape(g)[0] != n:
        raise ValueError(
          f"ogd: `output_grads` leaf {path} has shape {np.shape(g)}; expected "
          f"(n, *{tuple(np.shape(b)[1:])}) with the same n = {n} for every leaf."
        )
    if all(_state._is_concrete(g) for g in g_leaves):
      if not bool(_all_finite(g_leaves)):
        raise ValueError("ogd: `output_grads` holds non-finite values; expected finite values.")
    basis, count, dropped = _gram_schmidt_add(
      b_leaves, self.basis_count, self.basis_dropped, g_leaves, self.rtol
    )
    if _state._is_concrete(dropped) and int(dropped) > int(self.basis_dropped):
      cap = int(np.shape(b_leaves[0])[0])
      raise ValueError(
        f"ogd: the basis is full: max_directions={cap} holds {int(self.basis_count)} "
        f"directions and this task brings {int(dropped) - int(self.basis_dropped)} more "
        "independent ones than fit. Raise max_directions, or pass fewer output "
        "gradients per task."
      )
    treedef = jax.tree.structure(self.basis, is_leaf=_is_masked)
    it = iter(basis)
    full = [b if _is_masked(b) else next(it) for b in treedef.flatten_up_to(self.basis)]
    return self._replace(basis=treedef.unflatten(full), basis_count=count, basis_dropped=dropped)


def _paths(tree):
  return [
    jax.tree_util.keystr(p)
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_masked)
    if not _is_masked(x)
  ]


def _rows_dot(basis, vec):
  """``[K]`` dot products of every basis row with ``vec`` (lists of leaves)."""
  return sum(_contract(b.astype(_f32), v.astype(_f32), v.ndim) for b, v in zip(basis, vec))


def _static_widths(top: int) -> tuple[int, ...]:
  """The static column counts a GPM step may read: 0, 16, 32, 64, ... up to ``top``."""
  widths, w = [0], 16
  while w < top:
    widths.append(w)
    w *= 2
  return tuple(sorted({*widths, top}))


def _set_row(b, row, at):
  """``b.at[at].set(row)`` in place; on an explicit mesh the row takes ``b``'s sharding."""
  row = row[None].astype(b.dtype)
  try:
    return jax.lax.dynamic_update_slice_in_dim(b, row, at, axis=0)
  except Exception as e:  # jax's ShardingTypeError is private
    if type(e).__name__ != "ShardingTypeError":
      raise
    row = jax.sharding.reshard(row, jax.typeof(b).sharding)
    return jax.lax.dynamic_update_slice_in_dim(b, row, at, axis=0)


@jax.jit
def _gram_schmidt_add(basis, count, dropped, candidates, rtol):
  """Adds the candidates' new directions: block CGS2 against the stored rows,
  then Gram-Schmidt (twice) among the candidates themselves.

  The block pass reads the stored rows once per pass in chunks, up to the last
  filled one; the per-candidate pass reads only this call's new rows, so the
  cost grows with the directions stored, not with ``max_directions``.
  """
  cap = basis[0].shape[0]
  n = candidates[0].shape[0]
  v = [g.astype(_f32) for g in candidates]
  norm0 = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in v))
  chunk = min(cap, 256)

  def against_chunk(c, v):
    rows = [jax.lax.dynamic_slice_in_dim(b, c * chunk, chunk).astype(_f32) for b in basis]
    coef = sum(
      _contract(r, x, (list(range(1, r.ndim)),) * 2) for r, x in zip(rows, v)
    )  # [chunk, n]
    return [x - jnp.tensordot(coef.T, r, axes=1) for x, r in zip(v, rows)]

  n_chunks = (count + chunk - 1) // chunk
  for _ in range(2):  # "twice is enough" (re-orthogonalisation)
    v = jax.lax.fori_loop(0, n_chunks, against_chunk, v)

  block = min(n, cap)
  # This call's rows start here (the stored rows are 0 past count).
  first = jnp.minimum(count, cap - block)

  def body(i, carry):
    basis, count, dropped = carry
    x = [y[i] for y in v]
    new_rows = [jax.lax.dynamic_slice_in_dim(b, first, block).astype(_f32) for b in basis]
    for _ in range(2):
      coef = _rows_dot(new_rows, x)
      x = [y - jnp.tensordot(coef, r, axes=1) for y, r in zip(x, new_rows)]
    norm = jnp.sqrt(_sq_norm(x))
    new = (norm > rtol * norm0[i]) & (norm > 0)
    fits = new & (count < cap)
    at = jnp.minimum(count, cap - 1)
    basis = [
      _set_row(b, jnp.where(fits, y / jnp.where(fits, norm, 1.0), b[at].astype(_f32)), at)
      for b, y in zip(basis, x)
    ]
    return basis, count + fits.astype(jnp.int32), dropped + (new & ~fits).astype(jnp.int32)

  return jax.lax.fori_loop(0, n, body, (list(basis), count, dropped))


def ogd(
  max_directions: int, *, rtol: float = 1e-4, basis_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""OGD: orthogonal gradient descent (Farajtabar et al., 2020).

  Keeps an orthonormal basis :math:`S` of gradients of the model's outputs at
  samples of past tasks and removes their span from the gradient:

  .. math::
    \tilde g = g - \sum_{v \in S} \langle g, v \rangle\, v,

  with dot products over the whole pytree. :func:`cl_optax.consolidate` with
  ``output_grads=`` (leaves ``[n, *leaf.shape]``: the gradient of an output at
  each of ``n`` stored samples, see :func:`output_gradients`; the paper's
  default is the ground-truth logit) adds them one by one by Gram-Schmidt
  with re-orthogonalisation, skipping the ones already in the span.

  The buffer has a fixed capacity ``max_directions`` (state leaves
  ``[max_directions, *leaf.shape]``, so memory is ``max_directions`` times the
  model). A consolidate whose new independent directions do not fit raises a
  ``ValueError`` (nothing is truncated silently); traced under ``jit`` it cannot
  raise, and it counts the directions left out in ``basis_dropped`` instead.

  Args:
    max_directions: capacity of the basis (static; under
      ``optax.inject_hyperparams`` list it in ``static_args``).
    rtol: relative residual norm under which a candidate counts as dependent.
    basis_dtype: storage dtype of the basis (float32 when ``None``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Farajtabar, Azizan, Mott, Li, *Orthogonal Gradient Descent for Continual
    Learning*, AISTATS 2020 (arXiv:1910.07104), Alg. 1 and Eq. 4.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax.chain(cl_optax.ogd(max_directions=2), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> out = {"w": jnp.array([[2.0, 0.0, 0.0]])}  # one stored output gradient
    >>> state = cl_optax.consolidate(state, params, output_grads=out)
    >>> tx.update({"w": jnp.ones(3)}, state, params)[0]["w"]
    Array([-0., -1., -1.], dtype=float32)
  """
  dtype = _f32 if basis_dtype is None else basis_dtype

  def init_fn(params):
    def rows(p):  # broadcast from zeros_like: the rows are sharded like the leaf
      return jnp.broadcast_to(jnp.zeros_like(p, dtype)[None], (int(max_directions), *jnp.shape(p)))

    basis = jax.tree.map(rows, params)
    zero = jnp.zeros((), jnp.int32)
    return OGDState(basis, zero, jnp.zeros_like(zero), jnp.asarray(rtol, _f32))  # own buffers

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    pairs = _matching_leaves(
      updates, state.basis, transform="ogd", name="basis", lead=(int(max_directions),)
    )
    if not pairs:
      return updates, state
    coef = sum(_contract(b.astype(_f32), u.astype(_f32), u.ndim) for u, b in pairs)  # [K]
    ok = jnp.all(jnp.isfinite(coef))

    # Every row, filled or not: on CPU a matvec over the whole buffer is as fast as
    # reading a sliced prefix (XLA copies the slice before the dot).
    def leaf(u, b):
      if _is_masked(u) or u is None:
        return u
      new = u.astype(_f32) - jnp.tensordot(coef, b.astype(_f32), axes=1)
      return jnp.where(ok, new.astype(u.dtype), u)

    return jax.tree.map(leaf, updates, _restrict(updates, state.basis), is_leaf=_is_masked), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def output_gradients(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  inputs: jax.Array,
  labels: jax.Array | None = None,
) -> PyTree:
  """Per-sample gradients of a model output, OGD's signal (leaves ``[n, ...]``).

  With ``labels``, the gradient of the ground-truth logit at each sample (the
  paper's "GTL", its default); without, of the mean of the logits ("Avg").

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` for a batch ``x``.
    params: the parameters at the end of the task.
    inputs: ``[n, ...]`` stored samples.
    labels: optional ``[n]`` integer labels.

  Returns:
    A pytree like params whose leaves have a leading axis of size ``n``.
  """

  def one(x, y):
    def out(p):
      logits = apply_fn(p, x[None])[0]
      return logits.mean() if labels is None else logits[y]

    return jax.grad(out)(params)

  ys = jnp.zeros(inputs.shape[0], jnp.int32) if labels is None else labels
  return jax.jit(jax.vmap(one))(inputs, ys)


# -------------------------------------------------------------------- GPM


class GPMState(NamedTuple):
  """State of :func:`gpm`.

  Attributes:
    feature_basis: per projected leaf (a kernel ``[*in, out]``), an orthogonal
      ``[d_in, d_in]`` matrix (``d_in = prod(in)``) whose first
      ``feature_count`` columns are the protected basis :math:`M` and whose
      other columns span the rest of the input space, so the update projects
      through ``min(feature_count, d_in - feature_count)`` columns;
      ``optax.MaskedNode`` for leaves that are not projected.
    feature_count: per projected leaf, the number of basis columns (int32).
    gpm_tasks: number of consolidates so far (int32).
    energy_threshold: the default energy threshold (float32).
  """

  feature_basis: PyTree
  feature_count: PyTree
  gpm_tasks: jax.Array  # shape=(), int32
  energy_threshold: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> GPMState:
    """Grows every projected leaf's basis from the task's ``representations``."""
    del params
    reps = _state.require_signal(
      signals,
      "representations",
      "gpm",
      "a pytree holding, at the path of each projected kernel leaf, the layer's "
      "input activations [n, d_in] at n samples of the task",
    )
    thresholds = signals.get("gpm_threshold")
    basis_paths = _paths(self.feature_basis)
    b_leaves = [b for b in _leaves(self.feature_basis) if not _is_masked(b)]
    c_leaves = [c for c in _leaves(self.feature_count) if not _is_masked(c)]
    rep_by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(reps)}
    missing = [p for p in basis_paths if p not in rep_by_path]
    extra = [p for p in rep_by_path if p not in basis_paths]
    if missing or extra:
      raise ValueError(
        f"gpm: `representations` must hold one [n, d_in] array at the path of each "
        f"projected leaf; expected paths {basis_paths}, got {sorted(rep_by_path)} "
        f"(missing {missing}, unexpected {extra})."
      )
    thr_by_path = {}
    if thresholds is not None:
      thr_by_path = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(thresholds)
      }
      unknown = [p for p in thr_by_path if p not in basis_paths]
      if unknown:
        raise ValueError(
          f"gpm: `gpm_threshold` has paths {unknown} that are not projected leaves "
          f"(expected a subset of {basis_paths})."
        )
    new_b, new_c = [], []
    for path, b, c in zip(basis_paths, b_leaves, c_leaves, strict=True):
      d_in = b.shape[0]
      x = rep_by_path[path]
      if np.ndim(x) < 2 or int(np.prod(np.shape(x)[1:])) != d_in:
        raise ValueError(
          f"gpm: `representations` leaf {path} has shape {np.shape(x)}; expected "
          f"(n, {d_in}) (or (n, *in_shape)): the inputs of that layer at n samples."
        )
      x = jnp.reshape(jnp.asarray(x, _f32), (np.shape(x)[0], d_in))
      if _state._is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"gpm: `representations` leaf {path} holds non-finite values.")
      thr = thr_by_path.get(path, self.energy_threshold)
      if _state._is_concrete(thr) and not 0.0 <= float(thr) <= 1.0:
        raise ValueError(f"gpm: threshold for {path} is {float(thr)}; expected a value in [0, 1].")
      nb, nc = _gpm_grow(b, c, x, jnp.asarray(thr, _f32))
      new_b.append(nb)
      new_c.append(nc)
    return self._replace(
      feature_basis=_replace_unmasked(self.feature_basis, new_b),
      feature_count=_replace_unmasked(self.feature_count, new_c),
      gpm_tasks=self.gpm_tasks + 1,
    )


def _replace_unmasked(tree, new_leaves):
  treedef = jax.tree.structure(tree, is_leaf=_is_masked)
  it = iter(new_leaves)
  return treedef.unflatten([x if _is_masked(x) else next(it) for x in treedef.flatten_up_to(tree)])


@jax.jit
def _gpm_grow(basis, count, x, threshold):
  """GPM Eq. 8-9: adds the top left singular vectors of the residual activations."""
  d_in = basis.shape[0]
  idx = jnp.arange(d_in)
  R = x.T  # [d_in, n], columns are samples (the paper's R_l)
  M = jnp.where(idx[None, :] < count, basis.astype(_f32), 0.0)
  total = jnp.sum(R * R)
  R_hat = R - M @ (M.T @ R)
  U, S, _ = jnp.linalg.svd(R_hat, full_matrices=False)  # U [d_in, m]
  m = S.shape[0]
  safe_total = jnp.where(total > 0, total, 1.0)
  captured = (total - jnp.sum(R_hat * R_hat)) / safe_total
  cum = captured + jnp.cumsum(S * S) / safe_total
  # The smallest r with cum[r - 1] >= threshold (0 when already captured).
  r = jnp.where(captured >= threshold, 0, jnp.sum(cum < threshold) + 1)
  significant = jnp.sum(S > 1e-6 * jnp.maximum(S[0], 1e-30))
  r = jnp.minimum(jnp.minimum(r, significant), d_in - count)
  r = jnp.where(total > 0, r, 0).astype(jnp.int32)
  # Re-orthogonalise the new columns against the stored ones (float32 drift).
  U = U - M @ (M.T @ U)
  U = U / jnp.maximum(jnp.linalg.norm(U, axis=0, keepdims=True), 1e-30)
  src = idx - count
  take = (src >= 0) & (src < r)
  cols = jnp.take(U, jnp.clip(src, 0, m - 1), axis=1)
  new = jnp.where(take[None, :], cols, M)
  # The complement: I - M M^T has eigenvalue 0 on span(M) and 1 off it, and eigh
  # sorts ascending, so its eigenvectors from column `k` on span the rest.
  k = count + r
  _, V = jnp.linalg.eigh(jnp.eye(d_in, dtype=_f32) - new @ new.T)
  return jnp.where(idx[None, :] < k, new, V).astype(basis.dtype), k


def _project_out(q, count, g):
  """``g - M M^T g`` for ``M = q[:, :count]``, through the fewer of M or its complement.

  ``q`` is orthogonal, so ``g - M M^T g = N N^T g`` for the other columns ``N``.
  Each static width is a ``lax.switch`` branch, so only that many columns are
  read: the cost is ``2 d_in w out`` with ``w`` the next width at or above
  ``min(count, d_in - count)``, 0 before the first task and once the space is full.
  """
  d_in = q.shape[0]
  widths = _static_widths(d_in // 2)  # min(count, d_in - count) <= d_in // 2
  complement = count > d_in - count
  need = jnp.minimum(count, d_in - count)

  def branch(w):
    def project(q, g):
      if w == 0:
        return jnp.where(complement, jnp.zeros_like(g), g)
      start = jnp.where(complement, d_in - w, 0)
      cols = start + jnp.arange(w)
      keep = jnp.where(complement, cols >= count, cols < count)
      v = jnp.where(keep[None, :], jax.lax.dynamic_slice_in_dim(q, start, w, axis=1), 0.0)
      vvg = v @ (v.T @ g)
      return jnp.where(complement, vvg, g - vvg)

    return project

  index = jnp.searchsorted(jnp.asarray(widths), need)
  return jax.lax.switch(index, [branch(w) for w in widths], q.astype(g.dtype), g)


def _default_projected(params):
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2 and jnp.size(p) > 0, params)


def gpm(
  threshold: float = 0.97,
  *,
  layers: PyTree | Callable[[PyTree], PyTree] | None = None,
  freeze_unprojected: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""GPM: gradient projection memory (Saha, Garg & Roy, 2021).

  For each projected layer :math:`l` it keeps an orthonormal basis
  :math:`M_l` of the part of its *input space* that past tasks used, and
  removes that part from the kernel's gradient. A Flax kernel is
  ``[in, out]`` (a PyTorch weight is ``[out, in]``), so the projection acts on
  its first axis (all axes but the last for a conv kernel
  ``[kh, kw, in, out]``, whose inputs are the ``kh * kw * in`` patches):

  .. math::
    \nabla W_l \leftarrow \nabla W_l - M_l M_l^\top \nabla W_l .

  :func:`cl_optax.consolidate` with ``representations=`` grows the bases:
  :math:`R_l = X_l^\top` (the layer's inputs at ``n`` samples of the finished
  task, ``n = 300`` in the paper), :math:`\hat R_l = R_l - M_l M_l^\top R_l`
  (Eq. 8), and the top left singular vectors of :math:`\hat R_l` are added until
  the captured energy reaches ``threshold`` (Eq. 5 and 9). An optional
  ``gpm_threshold=`` signal (a tree like ``representations`` of floats) sets
  per-layer thresholds (the paper's PMNIST run uses 0.95, 0.99, 0.99).

  The buffer of a ``[d_in, out]`` kernel is ``[d_in, d_in]``, the whole input
  space, so it cannot overflow: ``feature_count == d_in`` means every input
  direction is protected and the kernel no longer moves. The buffer keeps an
  orthonormal basis of the unprotected directions in its other columns, so a
  step costs ``2 d_in w out`` with ``w`` about ``min(k, d_in - k)`` for ``k``
  protected directions (rounded up to one of a few static widths) rather than
  the ``d_in^2 out`` of a dense projector.

  Leaves not projected (by default the leaves with fewer than 2 dimensions:
  biases, norm scales) get a zero update from the first consolidate on when
  ``freeze_unprojected`` (as the official CIFAR code does for biases and
  batch norm), and pass unchanged otherwise.

  **Mapping representations to parameters (Flax).** ``representations`` holds,
  at the path of each projected kernel in the params tree, the activations
  that enter that layer, batch-major ``[n, d_in]``:

  .. code-block:: python

    class MLP(nnx.Module):
      def __init__(self, rngs):
        self.lin1 = nnx.Linear(784, 100, use_bias=False, rngs=rngs)
        self.lin2 = nnx.Linear(100, 100, use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(100, 10, use_bias=False, rngs=rngs)

      def __call__(self, x):
        return self.fc(relu(self.lin2(relu(self.lin1(x)))))

      def layer_inputs(self, x):  # keys mirror nnx.state(self, nnx.Param)
        h1 = relu(self.lin1(x))
        h2 = relu(self.lin2(h1))
        return {"lin1": {"kernel": x}, "lin2": {"kernel": h1}, "fc": {"kernel": h2}}

    params = nnx.state(model, nnx.Param)
    reps = model.layer_inputs(x_task[:300])
    cl_optax.consolidate(optimizer, params, representations=reps)

  Args:
    threshold: energy threshold :math:`\epsilon_{th} \in [0, 1]`.
    layers: optional labels in the style of ``optax.masked``: a pytree of bools
      like params, or a function ``params -> bools``, marking the kernels to
      project (default: every non-empty leaf with 2 or more dimensions). With
      ``optax.inject_hyperparams`` pass it in ``static_args``.
    freeze_unprojected: whether leaves that are not projected stop moving after
      the first task.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Saha, Garg, Roy, *Gradient Projection Memory for Continual Learning*,
    ICLR 2021 (arXiv:2103.09762), Eq. 5, 8, 9 and Sec. 4; official code
    sahagobinda/GPM (``main_pmnist.py`` ``update_GPM``). The first task keeps
    the smallest ``k`` that reaches the threshold (Eq. 5); the official code
    keeps one column fewer there.

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"kernel": jnp.zeros((3, 2))}
    >>> tx = optax.chain(cl_optax.gpm(threshold=0.99), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> x = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # inputs seen: span(e1)
    >>> state = cl_optax.consolidate(state, params, representations={"kernel": x})
    >>> tx.update({"kernel": jnp.ones((3, 2))}, state, params)[0]["kernel"]
    Array([[-0., -0.],
           [-1., -1.],
           [-1., -1.]], dtype=float32)
  """

  def init_fn(params):
    labels = (
      _state.resolve_labels(layers, params) if layers is not None else (_default_projected(params))
    )

    def make(is_proj, p):
      if not is_proj:
        return optax.MaskedNode(), optax.MaskedNode()
      shape = jnp.shape(p)
      if len(shape) < 2:
        raise ValueError(
          f"gpm: a projected leaf must have an input and an output axis; got shape {shape}."
        )
      d_in = int(np.prod(shape[:-1]))
      return jnp.zeros((d_in, d_in), _f32), jnp.zeros((), jnp.int32)

    pairs = jax.tree.map(make, labels, params)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not _is_masked(x)  # noqa: E731
    basis = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    count = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    return GPMState(
      feature_basis=basis,
      feature_count=count,
      gpm_tasks=jnp.zeros((), jnp.int32),
      energy_threshold=jnp.asarray(threshold, _f32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    frozen = state.gpm_tasks > 0

    def leaf(b, c, u):
      if _is_masked(u) or u is None:
        return u
      if _is_masked(b):
        if not freeze_unprojected:
          return u
        return jax.tree.map(lambda x: jnp.where(frozen & jnp.isfinite(x), jnp.zeros_like(x), x), u)
      d_in = b.shape[0]
      g = u.reshape(d_in, -1).astype(_f32)
      new = _project_out(b, c, g).reshape(u.shape)
      return jnp.where(jnp.all(jnp.isfinite(g)), new.astype(u.dtype), u)

    new_updates = jax.tree.map(
      leaf, state.feature_basis, state.feature_count, updates, is_leaf=_is_masked
    )
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
