r"""HAT, hard attention to the task (Serra et al., ICML 2018): :func:`hat` and its model-side parts.

The transform (:func:`hat`) masks the updates of the gated layers by the
cumulative unit attention of the finished tasks; the model-side pieces are
pure functions: the gate :func:`hat_gate` (whose gradient carries HAT's
embedding compensation), the per-epoch annealing :func:`hat_anneal` of
:math:`s`, and the attention regulariser :func:`hat_regularizer` (re-exported
by :mod:`cl_optax.losses`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_optax import _checks, _debug, _select, _trees

_TRANSFORM = "hat"


class _Plan(NamedTuple):
  """What :func:`hat` does to each leaf: ``(role, layer index)`` by leaf path."""

  roles: dict  # path -> ("kernel" | "bias" | "embedding" | "head", layer index or -1)
  widths: tuple  # units of each gated layer (0 where its kernel is masked out)
  orientation: dict  # kernel path -> "in_out" | "out_in"


def _one_kernel(items: list, selector: Any, i: int) -> tuple[str, Any]:
  kernels = [
    (p, x)
    for p, x in items
    if p.rsplit("/", 1)[-1] in ("kernel", "weight")
    and (_trees.is_masked(x) or np.ndim(x) >= 2)
    and _select.matches(selector, p, x)
  ]
  if len(kernels) != 1:
    raise ValueError(
      f"{_TRANSFORM}: layers[{i}] = {selector!r} must select exactly one kernel / weight "
      f"(a leaf of 2 or more axes); it selects {[p for p, _ in kernels]}."
    )
  return kernels[0]


def _plan(tree: Any, layers: Sequence[Any], embeddings: Any, heads: Any, orientation: Any) -> _Plan:
  """Resolves the selectors over ``tree``'s paths (params or updates: same paths)."""
  items = _select.leaves_with_paths(tree)
  paths = {p for p, _ in items}
  roles, widths, orient = {}, [], {}
  for i, sel in enumerate(layers):
    path, x = _one_kernel(items, sel, i)
    roles[path] = ("kernel", i)
    bias = f"{path.rpartition('/')[0]}/bias".lstrip("/")
    if bias in paths:
      roles[bias] = ("bias", i)
    if _trees.is_masked(x):
      widths.append(0)
      continue
    o = _select.kernel_orientation(_TRANSFORM, path, np.shape(x), orientation)
    orient[path] = o
    widths.append(int(np.shape(x)[0] if o == "out_in" else np.shape(x)[-1]))
  for i, sel in enumerate(embeddings or ()):
    for p, x in items:
      if _select.matches(sel, p, x):
        roles[p] = ("embedding", i)
  for p, x in items:
    if heads is not None and p not in roles and _select.matches(heads, p, x):
      roles[p] = ("head", -1)
  return _Plan(roles, tuple(widths), orient)


def _check_plan(plan: _Plan, params: Any) -> None:
  """The input width of each gated kernel must be a multiple of the previous layer's units."""
  for path, x in _select.leaves_with_paths(params):
    role, i = plan.roles.get(path, (None, -1))
    if role == "embedding" and not _trees.is_masked(x) and np.shape(x)[-1] != plan.widths[i]:
      raise ValueError(
        f"{_TRANSFORM}: embedding {path!r} of shape {np.shape(x)} must end in the "
        f"{plan.widths[i]} units of gated layer {i}."
      )
    if role != "kernel" or i == 0 or _trees.is_masked(x) or not plan.widths[i - 1]:
      continue
    d_in = np.shape(x)[1] if plan.orientation[path] == "out_in" else np.shape(x)[-2]
    if d_in % plan.widths[i - 1]:
      raise ValueError(
        f"{_TRANSFORM}: kernel {path!r} has {d_in} inputs, not a multiple of the "
        f"{plan.widths[i - 1]} units of the gated layer before it."
      )


class HATState(NamedTuple):
  """State of :func:`hat`.

  Attributes:
    hat_attention: tuple of float32 vectors, one per gated layer: the
      cumulative attention :math:`A_l` of the finished tasks (O(units), the
      kernel mask is computed in ``update``); ``MaskedNode`` for a layer whose
      kernel is masked out.
    hat_task: int32 scalar, the index of the task being trained (0-based);
      the embedding and head rows of other tasks get zero updates.
    hat_clamp: float32 scalar, the embedding clamp, refreshed from the factory
      argument at every update.
  """

  hat_attention: Any
  hat_task: jax.Array  # shape=(), int32
  hat_clamp: jax.Array  # shape=(), float32

  def consolidate(self, params: optax.Params, **signals: Any) -> HATState:
    """Merges the task's ``gates`` :math:`a_l(s_{max})` by element-wise max; next task."""
    del params
    gates = signals.get("gates")
    gates = tuple(gates) if isinstance(gates, list | tuple) else gates
    gates = _checks.validated_signal(
      {"gates": gates}, "gates", self.hat_attention, transform=_TRANSFORM, values="unit",
      what="one vector of gates a_l(s_max) in [0, 1] per gated layer, in the order of `layers`",
    )  # fmt: skip
    merged = _trees.map_unmasked(
      lambda a, g: jnp.maximum(a, _trees.placed_like(a, jnp.asarray(g, a.dtype))),
      self.hat_attention,
      gates,
    )
    return self._replace(hat_attention=merged, hat_task=self.hat_task + 1)


def _tile(a: jax.Array, n: int) -> jax.Array:
  """Unit attention of the layer below, tiled over a flattened NHWC input of ``n`` entries."""
  return jnp.tile(a, n // a.shape[0])


def _kernel_keep(a_in: Any, a_out: jax.Array, shape: tuple, orientation: str) -> jax.Array:
  """:math:`1 - \\min(A_{in}, A_{out})` (or :math:`1 - A_{out}`) broadcast to the kernel."""
  if orientation == "out_in":
    used = a_out[:, None] if a_in is None else jnp.minimum(a_out[:, None], _tile(a_in, shape[1]))
    return 1.0 - used
  used = a_out if a_in is None else jnp.minimum(_tile(a_in, shape[-2])[:, None], a_out[None, :])
  return 1.0 - used


def _rows_keep(task: jax.Array, shape: tuple) -> jax.Array:
  """1 on row ``task`` of a ``[T, ...]`` leaf, 0 on the other rows."""
  return (jnp.arange(shape[0]) == task).reshape((-1,) + (1,) * (len(shape) - 1))


def _masked_updates(plan: _Plan, updates: Any, state: HATState) -> Any:
  att = state.hat_attention

  def leaf(path, u):
    u_path = _trees.leaf_path(path)
    role, i = plan.roles.get(u_path, (None, -1))
    if _trees.is_masked(u) or u is None or role is None:
      return u
    if role in ("kernel", "bias") and _trees.is_masked(att[i]):
      return u
    if role == "kernel":
      a_in = att[i - 1] if i > 0 and not _trees.is_masked(att[i - 1]) else None
      keep = _kernel_keep(a_in, att[i], u.shape, plan.orientation[u_path])
    elif role == "bias":
      keep = 1.0 - att[i]
    else:
      keep = _rows_keep(state.hat_task, u.shape)
    return _trees.mask_leaf(u, keep)

  return jax.tree_util.tree_map_with_path(leaf, updates, is_leaf=_trees.is_masked)


def _clamped(plan: _Plan, updates: Any, params: Any, clamp: jax.Array) -> Any:
  """Embedding updates replaced by ``clip(e + u, -clamp, clamp) - e`` (finite entries)."""

  def leaf(path, u, p):
    if (
      _trees.is_masked(u)
      or u is None
      or plan.roles.get(_trees.leaf_path(path), ("",))[0] != ("embedding")
    ):
      return u
    p = jnp.asarray(p, u.dtype)
    c = jnp.asarray(clamp, u.dtype)
    return jnp.where(jnp.isfinite(u), jnp.clip(p + u, -c, c) - p, u)

  return jax.tree_util.tree_map_with_path(leaf, updates, params, is_leaf=_trees.is_masked)


def hat(
  layers: Sequence[Any],
  *,
  embeddings: Sequence[Any] | None = None,
  heads: Any = None,
  clamp: float = 6.0,
  orientation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HAT (Serra et al., ICML 2018): updates masked by the units earlier tasks attend to.

  Each gated layer :math:`l` multiplies its output units by gates
  :math:`a_l^t = \sigma(s\,e_l^t)` (model side: :func:`hat_gate`). After task
  :math:`t`, :func:`cl_optax.consolidate` with ``gates=`` (the vectors
  :math:`a_l^t(s_{max})`, one per layer in the order of ``layers``) merges
  :math:`A_l \leftarrow \max(A_l, a_l^t)`. On later tasks

  .. math::
    u_{W_l}[i, j] \leftarrow (1 - \min(A_{l-1}[i], A_l[j]))\,u_{W_l}[i, j], \qquad
    u_{b_l}[j] \leftarrow (1 - A_l[j])\,u_{b_l}[j]

  (Eq. 5 of the paper; the first layer uses :math:`1 - A_l[j]` only). The state
  holds the unit vectors :math:`A_l` (O(units)); the outer-min is computed in
  ``update`` (one ``min`` and one multiply per kernel entry, nothing stored).
  A kernel whose input is a flattened NHWC feature map (a dense layer after a
  conv) takes :math:`A_{l-1}` tiled over the positions, ``jnp.tile(A, H*W)``:
  JAX's row-major flatten of ``[H, W, C]`` puts the channel fastest (PyTorch's
  ``[C, H, W]`` flatten repeats each channel instead). Conv kernels
  ``[*window, in, out]`` are masked per ``(in, out)`` pair over the window.

  **Put it after the optimiser**, ``chain(adam(lr), hat(...))``: with momentum
  or Adam a masked gradient does not give a zero step. The official code
  relies on plain SGD rebuilt per task to keep the old tasks' embedding rows
  and heads still; here ``embeddings=`` and ``heads=`` (leaves with a leading
  task axis ``[T, ...]``) get a zero update outside row ``hat_task`` (the
  task count, advanced by each ``consolidate``), so they cannot drift under
  any optimiser. Embedding updates are then clamped so that
  :math:`e + u \in [-6, 6]` (the official ``thres_emb``; needs ``params``).

  Departures from the official code (``joansj/hat`` ``src/approaches/hat.py``):
  the embedding-gradient compensation
  :math:`\frac{s_{max}}{s}\frac{\cosh(s e) + 1}{\cosh e + 1}` is the backward
  pass of :func:`hat_gate` in its closed form :math:`s_{max}\,\sigma'(e)\,
  \partial L/\partial a` (no :math:`s_{max}^2` factor at :math:`s = 1/s_{max}`,
  no cosh clip); ``clip_by_global_norm(1e4)`` is the user's chain element; the
  attention regulariser is :func:`cl_optax.losses.hat_regularizer`.

  Args:
    layers: the gated layers in forward order, one selector each (see
      ``docs/selectors.md``) selecting exactly one kernel / weight; its sibling
      ``bias`` is masked by :math:`1 - A_l`. The input of layer :math:`l` is
      the gated output of layer :math:`l - 1`. List it in ``static_args``
      under ``optax.inject_hyperparams`` (also ``embeddings``, ``heads``,
      ``orientation``).
    embeddings: optional, one selector per gated layer (same order) of its
      task embedding leaf ``[T, units]``.
    heads: optional selector of per-task head leaves ``[T, ...]``.
    clamp: the embedding bound, 6 in the official code.
    orientation: kernel layout, ``"in_out"`` (Flax) or ``"out_in"``; read from
      the leaf name when ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Serra, Suris, Miron, Karatzoglou, *Overcoming catastrophic forgetting with
    hard attention to the task*, ICML 2018 (arXiv:1801.01423), Eqs. 1-5;
    official code ``joansj/hat`` (``src/approaches/hat.py``, ``networks/mlp_hat.py``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"l1": {"kernel": jnp.ones((2, 2))}, "l2": {"kernel": jnp.ones((2, 1))}}
    >>> tx = optax.chain(optax.sgd(1.0), cl_optax.hat(["l1", "l2"]))
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(state, params, gates=[jnp.array([1.0, 0.0]), jnp.array([1.0])])
    >>> tx.update(jax.tree.map(jnp.ones_like, params), state, params)[0]["l2"]["kernel"][:, 0]
    Array([-0., -1.], dtype=float32)
  """
  layers = tuple(layers)
  _checks.check_hyperparameter(clamp, transform=_TRANSFORM, name="clamp", low=0.0, open_low=True)
  if embeddings is not None and len(embeddings) != len(layers):
    raise ValueError(
      f"{_TRANSFORM}: `embeddings` needs one selector per gated layer ({len(layers)}); "
      f"got {len(embeddings)}."
    )

  def init_fn(params: optax.Params) -> HATState:
    plain = _trees.unwrap_variables(params)
    plan = _plan(plain, layers, embeddings, heads, orientation)
    _check_plan(plan, plain)
    att = tuple(jnp.zeros((w,), jnp.float32) if w else optax.MaskedNode() for w in plan.widths)
    return HATState(att, jnp.zeros((), jnp.int32), jnp.asarray(clamp, jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args(_TRANSFORM, extra_args)
    state = cast(HATState, state)
    plan = _plan(updates, layers, embeddings, heads, orientation)
    updates = _masked_updates(plan, updates, state)
    if embeddings:
      if params is None:
        raise ValueError(f"{_TRANSFORM}: update needs `params` to clamp the embeddings.")
      updates = _clamped(plan, updates, _trees.unwrap_variables(params), state.hat_clamp)
    return updates, state._replace(hat_clamp=jnp.asarray(clamp, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.custom_vjp
def _gate(e: jax.Array, s: jax.Array, s_max: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(s * e)


def _gate_fwd(e, s, s_max):
  return jax.nn.sigmoid(s * e), (e, s, s_max)


def _gate_bwd(res, g):
  e, s, s_max = res
  sig = jax.nn.sigmoid(e)
  return (s_max * sig * (1.0 - sig) * g).astype(e.dtype), jnp.zeros_like(s), jnp.zeros_like(s_max)


_gate.defvjp(_gate_fwd, _gate_bwd)


def hat_gate(embedding: jax.Array, s: Any, s_max: float = 400.0) -> jax.Array:
  r"""HAT's unit gate :math:`a = \sigma(s\,e)`, with the compensated embedding gradient.

  Forward: :math:`\sigma(s\,e)` (apply it to a layer's output after the
  activation and dropout, as the official ``mlp_hat.py`` does). Backward: the
  gradient the official code reaches after its compensation
  (``hat.py`` L138-142), in closed form,

  .. math::
    \frac{\partial L}{\partial e} = s_{max}\,\sigma'(e)\,\frac{\partial L}{\partial a}
    = \frac{s_{max}}{s}\,\frac{\cosh(s e) + 1}{\cosh e + 1}\cdot s\,\sigma'(s e)\,
      \frac{\partial L}{\partial a}

  so the update of :math:`e` does not depend on where :math:`s` is in its
  annealing. No gradient flows to ``s`` or ``s_max``.

  Example:
    >>> import jax, jax.numpy as jnp, cl_optax
    >>> cl_optax.hat_gate(jnp.array([0.0, 1.0]), 400.0)
    Array([0.5, 1. ], dtype=float32)
    >>> jax.grad(lambda e: cl_optax.hat_gate(e, 1.0, 4.0).sum())(jnp.zeros(1))  # 4 * 1/4
    Array([1.], dtype=float32)
  """
  e = jnp.asarray(embedding)
  return _gate(e, jnp.asarray(s, e.dtype), jnp.asarray(s_max, e.dtype))


def hat_anneal(example: Any, examples: Any, s_max: float = 400.0) -> jax.Array:
  r"""HAT's annealed :math:`s` for a batch: :math:`(s_{max} - 1/s_{max})\,i/N + 1/s_{max}`.

  ``example`` :math:`i` is the index of the batch's first example in the
  epoch and ``examples`` :math:`N` the examples of the task, so :math:`s`
  restarts at :math:`1/s_{max}` at **every epoch** and never quite reaches
  :math:`s_{max}` (official ``hat.py`` L120). Use :math:`s_{max}` at test
  time and for the ``gates=`` of :func:`hat`'s ``consolidate``.

  Example:
    >>> import cl_optax
    >>> float(cl_optax.hat_anneal(0, 100, 4.0)), float(cl_optax.hat_anneal(50, 100, 4.0))
    (0.25, 2.125)
  """
  i = jnp.asarray(example, jnp.float32)
  n = jnp.asarray(examples, jnp.float32)
  return (s_max - 1.0 / s_max) * i / n + 1.0 / s_max


def hat_regularizer(
  gates: Sequence[jax.Array], attention: Sequence[Any] | None = None, *, strength: float = 0.75
) -> jax.Array:
  r"""HAT's attention regulariser :math:`c\,R`, to add to the task loss.

  .. math::
    R = \frac{\sum_l \sum_i a_{l,i}\,(1 - A_{l,i})}{\sum_l \sum_i (1 - A_{l,i})}

  over all gated layers (both sums before dividing), with :math:`a` the
  current gates (at the annealed :math:`s`; they get gradient) and :math:`A`
  the cumulative attention of :func:`hat`'s state (``attention=None`` on the
  first task: :math:`A = 0`, so :math:`R` is the mean gate, as the official
  code's first-task branch). The denominator is the free capacity: near full
  capacity it is small and :math:`R` large; where it is 0 (every unit used)
  :math:`R = 0`. ``strength`` :math:`c` = 0.75 (official ``lamb``).

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> a, A = [jnp.array([1.0, 0.5])], [jnp.array([0.0, 1.0])]
    >>> cl_optax.losses.hat_regularizer(a, A, strength=1.0)
    Array(1., dtype=float32)
  """
  gates = [jnp.asarray(a, jnp.float32) for a in gates]
  if attention is None:
    attention = [jnp.zeros(a.shape[-1:], jnp.float32) for a in gates]
  if len(attention) != len(gates):
    raise ValueError(
      f"hat_regularizer: {len(gates)} gate vectors but {len(attention)} attention vectors."
    )
  free = [1.0 - jnp.asarray(A, jnp.float32) for A in attention]
  num = sum(jnp.sum(a * f) for a, f in zip(gates, free, strict=True))
  den = sum(jnp.sum(f) for f in free)
  return strength * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
