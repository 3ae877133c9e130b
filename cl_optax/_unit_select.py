r"""Which units :func:`cl_optax.unit_resets` resets: selectors and layer specs.

The selector protocol (:class:`UnitSelector`, scoring a :class:`UnitLayer`),
the built-in ReDo rule (:func:`redo_selector`), the fixed-shape pick of the
lowest-scoring eligible units (:func:`lowest_units`) and the parsing and
checking of the ``layers`` specs into leaf indices (``_layer_indices``).
The resets themselves (the writes, the inner state's zeroing) are in
:mod:`cl_optax._unit_resets`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cl_optax import _checks, _trees, _writes


class UnitLayer(NamedTuple):
  """The weights of one layer's units, as a selector sees them (after this step's update).

  Attributes:
    kernel_in: incoming weights ``[..., fan_in, n]`` (units on the last axis:
      a Flax ``Dense`` kernel ``[in, out]``, a conv kernel ``HWIO``).
    bias: the units' bias ``[n]``, or ``None``.
    kernel_out: outgoing weights ``[..., n, fan_out]`` (units on axis -2).
  """

  kernel_in: jax.Array
  bias: jax.Array | None
  kernel_out: jax.Array


class UnitSelector(NamedTuple):
  """Which units of a layer to reset: three pure, jittable functions.

  Attributes:
    init: ``n_units -> stats``, the selector's per-layer state (a pytree of
      arrays with fixed shapes, e.g. utilities and ages ``[n]``; ``()`` for
      none).
    score: ``(stats, activations, layer, step) -> (score, eligible, stats)``:
      ``activations`` ``[..., n]`` (this step's post-activation outputs of
      the layer), ``layer`` a :class:`UnitLayer` of the weights after this
      step's update, ``step`` the number of earlier updates (int32 scalar).
      Returns a ``[n]`` score (lower = reset first), a ``[n]`` bool of units
      that may be reset now, and the updated stats.
    reset: ``(stats, reset) -> stats``: the stats after the units of the
      ``[n]`` bool ``reset`` were re-drawn (e.g. age and utility to 0).
    mean_output: ``stats -> [n]``, the units' mean output (after this step's
      ``score``), or ``None``. Where a layer names its next layer's bias (a
      4-tuple in ``layers``), that bias absorbs the mean contribution of each
      reset unit (continual backprop): ``b_next += sum_j mean_j *
      kernel_out[..., j, :]`` over the reset units ``j``.
  """

  init: Callable[[int], Any]
  score: Callable[[Any, jax.Array, UnitLayer, jax.Array], tuple[jax.Array, jax.Array, Any]]
  reset: Callable[[Any, jax.Array], Any] = lambda stats, reset: stats
  mean_output: Callable[[Any], jax.Array] | None = None


def redo_selector(
  threshold: float = 0.0, *, every: int = 1, centered: bool = False
) -> UnitSelector:
  r"""ReDo's dormant units: normalised mean activation at or below ``threshold``.

  .. math::
    s_i = \frac{\mathbb{E}|h_i|}{\frac{1}{n}\sum_k \mathbb{E}|h_k| + 10^{-9}}, \qquad
    \text{eligible}_i = s_i \le \tau \ \text{at every } F\text{-th update}

  (the mean over every axis of the activations but the last; with
  ``centered``, :math:`h_i - \mathbb{E} h_i` in place of :math:`h_i`, as
  Dopamine's ``sub_mean_score``). Units are
  eligible after every ``every``-th update (``(step + 1) % every == 0``);
  :func:`unit_resets` resets at most ``max_units`` of them per layer, the
  lowest scores first (ReDo recycles all dormant units: set ``max_units`` to
  the layer width for that). No statistics are kept.

  Args:
    threshold: τ; ``0`` resets only units that are exactly dead on the batch.
    every: F, the reset period in updates (a static integer >= 1).
    centered: subtract each unit's batch mean before taking :math:`|h|`
      (Dopamine's ``sub_mean_score``; default ``False`` as there).

  Returns:
    A :class:`UnitSelector`.

  References:
    Sokar, Agarwal, Castro & Evci, *The dormant neuron phenomenon in deep
    reinforcement learning*, ICML 2023, Def. 3.1 (score) and Alg. 1;
    official code ``dopamine/labs/redo/weight_recyclers.py``.
  """
  _checks.check_hyperparameter(every, transform="redo_selector", name="every", low=1, integer=True)
  every = int(every)

  def score(stats, activations, layer, step):
    del layer
    h = jnp.asarray(activations, jnp.float32).reshape(-1, jnp.shape(activations)[-1])
    if centered:
      h = h - jnp.mean(h, axis=0)
    mean = jnp.mean(jnp.abs(h), axis=0)
    s = mean / (jnp.mean(mean) + 1e-9)
    due = (step + 1) % every == 0
    return s, (s <= threshold) & due, stats

  return UnitSelector(init=lambda n: (), score=score)


def lowest_units(score: jax.Array, eligible: jax.Array, k: int) -> jax.Array:
  """``[n]`` bool: the (at most) ``k`` eligible units of lowest finite score; ties by index."""
  n = score.shape[-1]
  k = min(int(k), n)
  score, eligible = _writes.replicated(score), _writes.replicated(eligible)  # top_k: whole axis
  valid = eligible & jnp.isfinite(score)
  s = jnp.where(valid, score.astype(jnp.float32), jnp.inf)
  _, idx = jax.lax.top_k(-s, k)
  return jnp.zeros(n, jnp.bool_).at[idx].set(True) & valid


def _layer_indices(
  params, layers, *, transform: str
) -> list[tuple[int, tuple[int, int | None, int, int | None]]]:
  """``(layer number, (kernel_in, bias, kernel_out, bias_out) leaf indices)`` of the layers.

  ``bias_out`` (the next layer's bias, an optional fourth path) is ``None`` when not given.

  A layer whose two kernels are both masked out (``optax.masked`` / ``partition``)
  is left out: the transform passes its updates through.
  """
  paths = _trees.leaf_paths(params)
  leaves = jax.tree.leaves(params, is_leaf=_trees.is_masked)
  where = {p: i for i, p in enumerate(paths)}
  out = []
  for li, spec in enumerate(layers):
    if not (isinstance(spec, Sequence) and len(spec) in (3, 4)):
      raise ValueError(
        f"{transform}: layers[{li}] is {spec!r}; expected (kernel_in_path, bias_path or None, "
        "kernel_out_path[, next_bias_path or None])."
      )
    idx = []
    roles = ("kernel_in", "bias", "kernel_out", "bias_out")
    for role, path in zip(roles, (*spec, None)[:4], strict=True):
      if path is None and role in ("bias", "bias_out"):
        idx.append(None)
        continue
      if path not in where:
        raise ValueError(
          f"{transform}: layers[{li}] {role} path {path!r} is not a leaf of params; "
          f"the leaves are {paths}."
        )
      idx.append(where[path])
    i_in, i_b, i_out, i_bo = idx
    k_in, k_out = leaves[i_in], leaves[i_out]
    if _trees.is_masked(k_in) and _trees.is_masked(k_out):
      continue
    if _trees.is_masked(k_in) or jnp.ndim(k_in) < 2:
      raise ValueError(
        f"{transform}: layers[{li}] kernel_in {spec[0]!r} has shape {jnp.shape(k_in)}; expected "
        "[..., fan_in, n] (units on the last axis, a Dense kernel [in, out])."
      )
    n = jnp.shape(k_in)[-1]
    if i_b is not None and tuple(jnp.shape(leaves[i_b])) != (n,):
      raise ValueError(
        f"{transform}: layers[{li}] bias {spec[1]!r} has shape {jnp.shape(leaves[i_b])}; "
        f"expected ({n},) (one per unit of kernel_in)."
      )
    if _trees.is_masked(k_out) or jnp.ndim(k_out) < 2 or jnp.shape(k_out)[-2] != n:
      raise ValueError(
        f"{transform}: layers[{li}] kernel_out {spec[2]!r} has shape {jnp.shape(k_out)}; "
        f"expected [..., {n}, fan_out] (the {n} units on axis -2, a Dense kernel [in, out])."
      )
    if i_bo is not None and tuple(jnp.shape(leaves[i_bo])) != (jnp.shape(k_out)[-1],):
      raise ValueError(
        f"{transform}: layers[{li}] next bias {spec[3]!r} has shape {jnp.shape(leaves[i_bo])}; "
        f"expected ({jnp.shape(k_out)[-1]},) (one per output of kernel_out)."
      )
    out.append((li, (i_in, i_b, i_out, i_bo)))
  return out
