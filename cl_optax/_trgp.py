r"""TRGP: trust region gradient projection (Lin et al., ICLR 2022), on GPM's basis storage."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _trees
from cl_optax._gpm_project import append_columns, project_updates, projected_buffers
from cl_optax._gpm_signals import layer_signals
from cl_optax._trgp_parts import TRGPView, trgp_trust_region


class TRGPState(NamedTuple):
  """State of :func:`trgp`.

  Attributes:
    trgp_basis: per projected kernel, GPM's orthogonal ``[d_in, d_in]`` matrix
      whose first ``trgp_count`` columns span every old task's input subspace
      (the update is projected out of it).
    trgp_count: per projected kernel, the number of global basis columns (int32).
    trgp_task_basis: per projected kernel, ``[max_tasks, d_in, width]``: task
      :math:`t`'s own subspace :math:`S_t` (old and new columns, by descending
      energy; 0 beyond ``trgp_task_count``).
    trgp_task_count: per projected kernel, ``[max_tasks]`` int32.
    trgp_selected: per projected kernel, ``[max_tasks, top]`` int32: the old
      tasks selected as task :math:`t`'s trust region.
    trgp_active: per projected kernel, ``[max_tasks, top]`` bool: whether each
      selected task is in regime 2 (it scales the layer).
    trgp_tasks: number of finished tasks (consolidates with ``representations=``).
    trgp_threshold: the default energy threshold (refreshed at every update).
    trgp_eps: :math:`\\epsilon_1` of the trust region (refreshed at every update).
    trgp_official: bool, the official code's quirks (refreshed at every update).
  """

  TRANSFORM = "trgp"
  SIGNALS = ("representations", "threshold", "next_grads")
  EXTRA_ARGS = ()

  trgp_basis: Any
  trgp_count: Any
  trgp_task_basis: Any
  trgp_task_count: Any
  trgp_selected: Any
  trgp_active: Any
  trgp_tasks: jax.Array  # shape=(), int32
  trgp_threshold: jax.Array  # shape=(), float32
  trgp_eps: jax.Array  # shape=(), float32
  trgp_official: jax.Array  # shape=(), bool

  def consolidate(self, params: optax.Params, **signals: Any) -> TRGPState:
    """The end of a task (``representations=``: basis growth) and/or the start of the
    next (``next_grads=``: its trust region), in that order."""
    if "representations" not in signals and "next_grads" not in signals:
      raise ValueError(
        "trgp: consolidate needs the signal `representations=` (at the end of a task: each "
        "projected layer's inputs [n, d_in] at the path of its kernel, as for gpm) and/or "
        "`next_grads=` "
        "(at the start of the next task: the gradient of its loss on a few hundred of its "
        "samples, a pytree like params); got neither."
      )
    state = self
    if "representations" in signals:
      state = state._grow(params, signals)
    if "next_grads" in signals:
      state = state._select(signals["next_grads"])
    return state

  def _grow(self, params: Any, signals: dict) -> TRGPState:
    t = self.trgp_tasks
    if self._max_tasks() and _checks.is_concrete(t) and int(t) >= self._max_tasks():
      raise ValueError(
        f"trgp: {int(t)} tasks already consolidated, the most max_tasks="
        f"{self._max_tasks()} allows; build trgp with a larger max_tasks."
      )
    inputs = layer_signals(self.trgp_basis, params, signals, self.trgp_threshold, "trgp")
    leaves = zip(
      inputs,
      _trees.unmasked_leaves(self.trgp_basis),
      _trees.unmasked_leaves(self.trgp_count),
      _trees.unmasked_leaves(self.trgp_task_basis),
      _trees.unmasked_leaves(self.trgp_task_count),
      strict=True,
    )
    new = [
      _trgp_grow(b, c, tb, tc, t, x, thr, self.trgp_official) for (x, thr), b, c, tb, tc in leaves
    ]
    rep = lambda tree, i: _trees.replace_unmasked(tree, [n[i] for n in new])  # noqa: E731
    return self._replace(
      trgp_basis=rep(self.trgp_basis, 0),
      trgp_count=rep(self.trgp_count, 1),
      trgp_task_basis=rep(self.trgp_task_basis, 2),
      trgp_task_count=rep(self.trgp_task_count, 3),
      trgp_tasks=t + 1,
    )

  def _select(self, grads: Any) -> TRGPState:
    paths = _trees.unmasked_key_strings(self.trgp_basis)
    by_path = {_trees.key_string(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    missing = [p for p in paths if p not in by_path]
    if missing:
      raise ValueError(
        f"trgp: `next_grads` must hold the gradient of each projected kernel; missing {missing} "
        f"(expected a pytree like params with leaves at {paths})."
      )
    t = self.trgp_tasks
    sel, act = [], []
    for path, tb, s, a in zip(
      paths,
      _trees.unmasked_leaves(self.trgp_task_basis),
      _trees.unmasked_leaves(self.trgp_selected),
      _trees.unmasked_leaves(self.trgp_active),
      strict=True,
    ):
      g = _as_matrix(path, by_path[path], tb.shape[1])
      top = s.shape[1]
      ns, na = trgp_trust_region(g, tb, t, self.trgp_eps, top=top, official=self.trgp_official)
      sel.append(jax.lax.dynamic_update_slice(s, ns[None], (t, 0)))
      act.append(jax.lax.dynamic_update_slice(a, na[None], (t, 0)))
    return self._replace(
      trgp_selected=_trees.replace_unmasked(self.trgp_selected, sel),
      trgp_active=_trees.replace_unmasked(self.trgp_active, act),
    )

  def _max_tasks(self) -> int:
    leaves = _trees.unmasked_leaves(self.trgp_task_count)
    return int(leaves[0].shape[0]) if leaves else 0


def _as_matrix(path: str, g: Any, d_in: int) -> jax.Array:
  """A kernel's gradient as ``[d_in, out]`` (a ``[out, in]`` weight transposed)."""
  g = jnp.asarray(g, jnp.float32)
  if jnp.ndim(g) >= 2 and int(np.prod(g.shape[:-1])) != d_in and g.shape[-1] == d_in:
    g = g.T
  if jnp.ndim(g) < 2 or int(np.prod(g.shape[:-1])) != d_in:
    raise ValueError(
      f"trgp: `next_grads` leaf {path} has shape {jnp.shape(g)}; expected the kernel's "
      f"gradient, whose input axes hold {d_in} entries."
    )
  return g.reshape(d_in, -1)


@jax.jit
def _trgp_grow(basis, count, task_basis, task_count, task, x, threshold, official):
  """TRGP's growth (``get_space_and_grad``): task ``task``'s own subspace and the global basis."""
  d_in = basis.shape[0]
  idx = jnp.arange(d_in)
  R = x.T  # [d_in, n]
  M = jnp.where(idx[None, :] < count, basis.astype(jnp.float32), 0.0)
  total = jnp.sum(R * R)
  delta = jnp.sum(jnp.square(M.T @ R), axis=1)  # m_i^T R R^T m_i
  U, S, _ = jnp.linalg.svd(R - M @ (M.T @ R), full_matrices=False)
  significant = S > 1e-6 * jnp.maximum(S[0], 1e-30)
  energy = jnp.concatenate(
    [jnp.where(idx < count, delta, -jnp.inf), jnp.where(significant, S * S, -jnp.inf)]
  )
  order = jnp.argsort(-energy, stable=True)
  valid = jnp.isfinite(energy[order])
  cum = jnp.cumsum(jnp.where(valid, energy[order], 0.0))
  # task 0: #{cum < eps} (GPM's official rule); later: add while the sum is below eps
  r = jnp.where(task == 0, jnp.sum(cum < threshold * total), jnp.sum(cum < threshold * total) + 1)
  r = jnp.minimum(jnp.minimum(r, jnp.sum(valid)), d_in)
  r = jnp.where(total > 0, r, 0).astype(jnp.int32)
  chosen = jnp.arange(order.shape[0]) < r
  r_new = jnp.sum(chosen & (order >= d_in)).astype(jnp.int32)  # a prefix of U's columns
  # the official code's `sel_index > r_pre` leaves U's first column out of the global basis
  skip = (official & (task > 0) & (r_new > 0)).astype(jnp.int32)
  cols = jnp.concatenate([U, jnp.zeros_like(U[:, :1])], axis=1)
  cols = jax.lax.dynamic_slice_in_dim(cols, skip, U.shape[1], axis=1)
  new_basis, new_count = append_columns(basis, count, cols, jnp.minimum(r_new - skip, d_in - count))
  width = task_basis.shape[-1]
  candidates = jnp.concatenate([M, U], axis=1)
  own = jnp.take(candidates, order[:width], axis=1)
  own = jnp.where((jnp.arange(width) < r)[None, :], own, 0.0).astype(task_basis.dtype)
  task_basis = jax.lax.dynamic_update_slice(task_basis, own[None], (task, 0, 0))
  task_count = task_count.at[task].set(jnp.minimum(r, width))
  return new_basis, new_count, task_basis, task_count


def trgp_view(opt_state: Any, task: Any, width: int | None = None) -> Any:
  """Each projected layer's :class:`TRGPView` for task ``task``: the bases of the old tasks
  selected as its trust region (their first ``width`` columns) and which are active.

  ``opt_state`` is a :class:`TRGPState` or any optimiser state holding one; ``task``
  may be traced (jittable: a gather of ``[top, d_in, width]`` per layer). Returns a
  pytree like the state's bases, a :class:`TRGPView` at each projected kernel and
  ``optax.MaskedNode`` elsewhere; before task ``task``'s trust region was selected
  (and for task 0) every slot is inactive.
  """
  state = _trees.find_state(opt_state, TRGPState, "trgp_view")
  t = jnp.asarray(task, jnp.int32)

  def leaf(tb, sel, act):
    w = tb.shape[-1] if width is None else min(int(width), tb.shape[-1])
    return TRGPView(tb[sel[t]][:, :, :w], act[t])

  return _trees.map_unmasked(leaf, state.trgp_task_basis, state.trgp_selected, state.trgp_active)


def _static_int(name: str, v: Any) -> int:
  """A shape argument as a Python int (a concrete integer array too: inject_hyperparams)."""
  if hasattr(v, "dtype") and _checks.is_concrete(v) and jnp.issubdtype(v.dtype, jnp.integer):
    v = int(v)
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ValueError(f"trgp: {name} must be a positive int (static); got {v!r}.")
  return v


def trgp(
  threshold: float = 0.97,
  *,
  max_tasks: int,
  eps: float = 0.2,
  top: int = 2,
  width: int | None = None,
  layers: Any = None,
  orientation: str | None = None,
  freeze_unprojected: bool = True,
  official: bool = False,
  basis_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""TRGP: trust region gradient projection (Lin, Yang, Fan, Zhang, ICLR 2022).

  GPM (:func:`cl_optax.gpm`) plus forward transfer. The kernel's gradient is
  projected out of **all** old tasks' input subspaces, as GPM's:
  :math:`\nabla W \leftarrow \nabla W - M M^\top \nabla W`. In addition each
  layer may re-use the subspaces of its most related old tasks (the *trust
  region*) through the scaled weight, a model-side function with the scaling
  :math:`Q_s` in the parameters (:func:`cl_optax.trgp_scaled_kernel`):

  .. math::
    W_{eff} = W + \sum_{s \in TR} M_s (Q_s - I) M_s^\top W .

  The boundary goes through :func:`cl_optax.consolidate`:

  * ``representations=`` at the end of task :math:`t` (each projected layer's
    inputs ``[n, d_in]`` computed with the raw :math:`W`, not :math:`W_{eff}`,
    as the code does): with :math:`\delta_i = m_i^\top R R^\top m_i` for the
    global basis and :math:`\sigma_k^2` of the residual
    :math:`R - MM^\top R`, the largest of :math:`[\delta, \sigma^2]` are
    taken until their sum reaches ``threshold`` :math:`\cdot \lVert R
    \rVert_F^2` (the first task: :math:`\#\{k : \text{cum}_k < \epsilon\}`, GPM's
    official rule); the chosen columns are task :math:`t`'s own subspace
    :math:`S_t` (kept in a static slot), and its new columns join the global basis.
  * ``next_grads=`` at the start of task :math:`t+1` (a pytree like params: the
    gradient of its loss on a few hundred of its samples, 300 in the code):
    :func:`cl_optax.trgp_trust_region` per layer, the ``top`` old tasks with
    the largest :math:`\lVert S_j^\top g\rVert`, active when above
    :math:`\epsilon_1 \lVert g\rVert`. Both may come in one call (growth first).

  :func:`cl_optax.trgp_view` gives each layer's selected bases for a task, for
  training it and for evaluating it later with its own :math:`Q` (TRGP needs the
  task id at test time). Keep one :math:`Q` per task and slot in the params
  (``[max_tasks, top, w, w]`` per layer, identity at init: a task's block is
  trained only during that task) and route it to its own optimiser with
  ``optax.partition``; this transform sees only the network's parameters.

  Departures from the official code (``main_pmnist.py``, ``layers.py``):
  ``official=True`` reproduces two quirks, the hard-coded trust regions of tasks 1
  (``[0]``) and 2 (``[1]``, one task) and ``sel_index > r_pre``, which leaves
  the first new direction of every later task out of the global basis (so the
  update is not projected out of it). Per-task subspaces are stored at a static
  ``width`` (the first columns by energy; the full ``d_in`` by default), and a
  ``Q`` narrower than that scales only its leading columns.

  Args:
    threshold: energy threshold :math:`\epsilon \in [0, 1]` (a ``threshold=``
      signal sets it per layer, as for :func:`cl_optax.gpm`; the code's PMNIST:
      0.95, 0.99, 0.99).
    max_tasks: the number of per-task slots (static).
    eps: :math:`\epsilon_1` of the trust region (0.2 in the code).
    top: old tasks per layer in the trust region (2 in the code; static).
    width: columns stored per task subspace (static; ``None``: ``d_in``).
    layers: the kernels to project, as :func:`cl_optax.gpm` (static).
    orientation: as :func:`cl_optax.gpm`.
    freeze_unprojected: as :func:`cl_optax.gpm`.
    official: the code's quirks above.
    basis_dtype: as :func:`cl_optax.gpm` (static).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Lin, Yang, Fan, Zhang, *TRGP: Trust Region Gradient Projection for
    Continual Learning*, ICLR 2022 (arXiv:2202.02931), Sec. 4; code
    LYang-666/TRGP (``main_pmnist.py`` ``grad_proj_cond``, ``get_space_and_grad``;
    ``layers.py``).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> params = {"kernel": jnp.zeros((3, 1))}
    >>> tx = cl_optax.trgp(0.9, max_tasks=3)
    >>> x0 = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # energies 0.8, 0.2: keeps e1
    >>> state = cl_optax.consolidate(tx.init(params), params, representations={"kernel": x0})
    >>> g1 = {"kernel": jnp.array([[1.0], [0.1], [0.0]])}  # task 1's gradient: in task 0's space
    >>> state = cl_optax.consolidate(state, params, next_grads=g1)
    >>> view = cl_optax.trgp_view(state, 1, width=2)["kernel"]
    >>> view.bases.shape, bool(view.active[0]), bool(view.active[1])
    ((2, 3, 2), True, False)
    >>> tx.update(g1, state)[0]["kernel"][:, 0]  # the step leaves task 0's space alone
    Array([0. , 0.1, 0. ], dtype=float32)
  """
  dtype = jnp.float32 if basis_dtype is None else basis_dtype
  _checks.check_hyperparameter(threshold, transform="trgp", name="threshold", low=0.0, high=1.0)
  _checks.check_hyperparameter(eps, transform="trgp", name="eps", low=0.0)
  max_tasks, top = _static_int("max_tasks", max_tasks), _static_int("top", top)
  width = None if width is None else _static_int("width", width)

  def init_fn(params: optax.Params) -> TRGPState:
    basis, count = projected_buffers(layers, params, dtype, orientation, "trgp")
    mk = lambda f: _trees.map_unmasked(f, basis)  # noqa: E731
    return TRGPState(
      trgp_basis=basis,
      trgp_count=count,
      trgp_task_basis=mk(
        lambda b: jnp.zeros((max_tasks, b.shape[0], min(width or b.shape[0], b.shape[0])), dtype)
      ),
      trgp_task_count=mk(lambda b: jnp.zeros((max_tasks,), jnp.int32)),
      trgp_selected=mk(lambda b: jnp.zeros((max_tasks, top), jnp.int32)),
      trgp_active=mk(lambda b: jnp.zeros((max_tasks, top), bool)),
      trgp_tasks=jnp.zeros((), jnp.int32),
      trgp_threshold=jnp.asarray(threshold, jnp.float32),
      trgp_eps=jnp.asarray(eps, jnp.float32),
      trgp_official=jnp.asarray(official),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args("trgp", extra_args)
    del params, extra_args
    state = cast(TRGPState, state)
    _checks.check_updates(updates, state.trgp_basis, transform="trgp", shapes=False)
    new_updates = project_updates(
      updates,
      state.trgp_basis,
      state.trgp_count,
      state.trgp_tasks > 0,
      orientation=orientation,
      freeze_unprojected=freeze_unprojected,
    )
    return new_updates, state._replace(
      trgp_threshold=jnp.asarray(threshold, jnp.float32),
      trgp_eps=jnp.asarray(eps, jnp.float32),
      trgp_official=jnp.asarray(official),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
