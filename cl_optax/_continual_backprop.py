r"""Continual backprop (Dohare et al., 2024) and ReDo (Sokar et al., 2023) over :func:`unit_resets`.

:func:`cbp_selector` is continual backprop's generate-and-test rule as a
:class:`cl_optax.UnitSelector` (utilities, ages, the replacement
accumulator); :func:`continual_backprop` and :func:`redo` are thin factories
over :func:`cl_optax.unit_resets` with the official selector, initialiser and
defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _writes
from cl_optax._unit_resets import UnitLayer, UnitSelector, redo_selector, unit_resets

_CBP = "continual_backprop"
_UTILITIES = ("contribution", "adaptable_contribution")


class CBPStats(NamedTuple):
  """Per-layer statistics of :func:`cbp_selector` (in ``UnitResetsState.reset_stats``).

  Attributes:
    cbp_utility: ``[n]`` float32, the running utility :math:`u` (not bias-corrected).
    cbp_mean_output: ``[n]`` float32, the running mean output :math:`f`
      (not bias-corrected).
    cbp_age: ``[n]`` int32, updates since each unit was (re)drawn.
    cbp_accumulator: float32 scalar, :math:`n_l`, replacements owed.
  """

  cbp_utility: jax.Array
  cbp_mean_output: jax.Array
  cbp_age: jax.Array
  cbp_accumulator: jax.Array


def _reduce_but(x: jax.Array, axis: int) -> jax.Array:
  """Mean of ``x`` over every axis but ``axis``."""
  axis = axis % x.ndim
  return jnp.mean(x, axis=tuple(a for a in range(x.ndim) if a != axis))


def _check_cbp_hyperparameters(
  replacement_rate: float,
  decay_rate: float,
  maturity_threshold: int,
  utility: str,
  max_units: int | None,
) -> None:
  """Raises a ``ValueError`` naming ``cbp_selector`` for an out-of-range hyperparameter."""
  name = "cbp_selector"
  _checks.check_hyperparameter(replacement_rate, transform=name, name="replacement_rate", low=0.0)
  _checks.check_hyperparameter(decay_rate, transform=name, name="decay_rate", low=0.0, high=1.0)
  if _checks.is_concrete(decay_rate) and not callable(decay_rate) and float(decay_rate) >= 1.0:
    raise ValueError(f"{name}: `decay_rate` must be a finite number < 1; got {decay_rate:g}.")
  _checks.check_hyperparameter(
    maturity_threshold, transform=name, name="maturity_threshold", low=0.0
  )
  if utility not in _UTILITIES:
    raise ValueError(f"{name}: `utility` must be one of {_UTILITIES}; got {utility!r}.")
  if max_units is not None:
    _checks.check_hyperparameter(max_units, transform=name, name="max_units", low=1, integer=True)


def _cbp_init(n: int) -> CBPStats:
  """Fresh :class:`CBPStats` for a layer of ``n`` units (all zero)."""
  return CBPStats(
    cbp_utility=jnp.zeros((n,), jnp.float32),
    cbp_mean_output=jnp.zeros((n,), jnp.float32),
    cbp_age=jnp.zeros((n,), jnp.int32),
    cbp_accumulator=jnp.zeros((), jnp.float32),
  )


def _cbp_reset(stats: CBPStats, r: jax.Array) -> CBPStats:
  """``stats`` with the units where ``r`` holds restarted (utility, mean output, age 0)."""
  return stats._replace(
    cbp_utility=jnp.where(r, 0.0, stats.cbp_utility),
    cbp_mean_output=jnp.where(r, 0.0, stats.cbp_mean_output),
    cbp_age=jnp.where(r, 0, stats.cbp_age),
  )


def _lowest_mature(
  u_hat: jax.Array, mature: jax.Array, k: jax.Array, max_units: int | None
) -> jax.Array:
  """The ``k`` mature units of lowest utility (ties by index), at most ``max_units`` of them."""
  n = u_hat.shape[0]
  kk = n if max_units is None else min(int(max_units), n)
  s = _writes.replicated(jnp.where(mature, u_hat, jnp.inf))  # top_k: the whole unit axis
  _, idx = jax.lax.top_k(-s, kk)
  return jnp.zeros((n,), jnp.bool_).at[idx].set(jnp.arange(kk) < k) & mature


def cbp_selector(
  replacement_rate: float = 1e-6,
  decay_rate: float = 0.99,
  maturity_threshold: int = 100,
  *,
  utility: str = "adaptable_contribution",
  max_units: int | None = None,
) -> UnitSelector:
  r"""Continual backprop's generate-and-test rule as a :class:`cl_optax.UnitSelector`.

  At every update, per layer, with :math:`h` this batch's outputs (from the
  forward pass before the step) and the weights after the step (code
  ``lop/algos/gnt.py`` ``test_features``, ``update_utility``):

  .. math::
    a_i &\leftarrow a_i + 1, \qquad c_i = 1 - \eta^{a_i} \\
    f_i &\leftarrow \eta f_i + (1-\eta)\,\overline{h_i}, \qquad \hat f_i = f_i / c_i \\
    y_i &= \overline{|W_{\text{out}}|}_i \cdot \overline{|h_i - \hat f_i|} \,/\,
           \overline{|W_{\text{in}}|}_i \quad \text{(adaptable contribution)} \\
    u_i &\leftarrow \eta u_i + (1-\eta)\,y_i, \qquad \hat u_i = u_i / c_i

  (bars: means over the batch, over the unit's outgoing weights, over its
  incoming weights; ``utility="contribution"``:
  :math:`y_i = \overline{|W_{\text{out}}|}_i\,\overline{|h_i|}`). Units with
  :math:`a_i > m` are eligible; :math:`n_l \mathrel{+}= \rho\,|\text{eligible}|`
  and the :math:`k = \lfloor n_l \rfloor` eligible units of lowest
  :math:`\hat u` are replaced (:math:`n_l \mathrel{-}= k`; the official
  ``accumulate=True``). Replaced units restart with :math:`a = u = f = 0`.
  ``mean_output`` gives :math:`\hat f` (what the next layer's bias absorbs,
  see :func:`continual_backprop`).

  Args:
    replacement_rate: :math:`\rho \ge 0`, fraction of eligible units replaced
      per update; default 1e-6 (online permuted MNIST; ``GnT``'s class
      default is 1e-4).
    decay_rate: :math:`\eta \in [0, 1)`; default 0.99 ("in all experiments").
    maturity_threshold: :math:`m \ge 0`; default 100 (online permuted MNIST;
      ``GnT``'s class default 20).
    utility: ``"adaptable_contribution"`` (default, the online permuted-MNIST
      and regression runs) or ``"contribution"`` (the paper's Eq. 1).
    max_units: cap on :math:`k` per update (static); the excess stays in
      :math:`n_l` for later updates. Give :func:`cl_optax.unit_resets` the
      same ``max_units`` (:func:`continual_backprop` does): units chosen
      here beyond the wrapper's cap are taken off :math:`n_l` without being
      reset. ``None``: no cap.

  Returns:
    A :class:`cl_optax.UnitSelector` with ``mean_output``.

  References:
    Dohare et al., *Loss of plasticity in deep continual learning*, Nature
    632, 2024, Methods (Eq. 1, the generate-and-test algorithm); official
    code ``shibhansh/loss-of-plasticity`` ``lop/algos/gnt.py``.
  """
  _check_cbp_hyperparameters(replacement_rate, decay_rate, maturity_threshold, utility, max_units)

  def correction(age):
    return 1.0 - jnp.power(jnp.asarray(decay_rate, jnp.float32), age.astype(jnp.float32))

  def score(stats: CBPStats, activations, layer: UnitLayer, step):
    del step
    eta = jnp.asarray(decay_rate, jnp.float32)
    h = jnp.asarray(activations, jnp.float32)
    h = h.reshape(-1, h.shape[-1])
    age = stats.cbp_age + 1
    c = correction(age)
    f = eta * stats.cbp_mean_output + (1.0 - eta) * jnp.mean(h, axis=0)
    f_hat = f / c
    w_out = _reduce_but(jnp.abs(layer.kernel_out.astype(jnp.float32)), -2)
    if utility == "contribution":
      y = w_out * jnp.mean(jnp.abs(h), axis=0)
    else:
      w_in = _reduce_but(jnp.abs(layer.kernel_in.astype(jnp.float32)), -1)
      y = w_out * jnp.mean(jnp.abs(h - f_hat), axis=0) / w_in
    u = eta * stats.cbp_utility + (1.0 - eta) * y
    u_hat = u / c
    mature = age > jnp.asarray(maturity_threshold)
    acc = stats.cbp_accumulator + jnp.asarray(replacement_rate, jnp.float32) * jnp.sum(mature)
    chosen = _lowest_mature(u_hat, mature, jnp.floor(acc), max_units)
    new = CBPStats(
      cbp_utility=u,
      cbp_mean_output=f,
      cbp_age=age,
      cbp_accumulator=acc - jnp.sum(chosen).astype(jnp.float32),
    )
    return u_hat, chosen, new

  def mean_output(stats: CBPStats):
    return stats.cbp_mean_output / correction(stats.cbp_age)

  return UnitSelector(init=_cbp_init, score=score, reset=_cbp_reset, mean_output=mean_output)


def continual_backprop(
  inner: optax.GradientTransformation,
  *,
  layers: Sequence[tuple[str | None, ...]],
  replacement_rate: float = 1e-6,
  decay_rate: float = 0.99,
  maturity_threshold: int = 100,
  utility: str = "adaptable_contribution",
  max_units: int = 1,
  reinit: Callable[[jax.Array, tuple, Any], jax.Array] | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Continual backprop (Dohare et al., 2024): re-draw the least useful mature units every step.

  :func:`cl_optax.unit_resets` around ``inner`` with :func:`cbp_selector`:
  after each update, per hidden layer, the :math:`\lfloor n_l \rfloor`
  mature units (age :math:`> m`) of lowest bias-corrected utility
  :math:`\hat u` are replaced (utilities, accumulator: see
  :func:`cbp_selector`):

  - incoming weights := a fresh draw of the initial law (``reinit``,
    default He/Kaiming uniform :math:`U(-b, b)`, :math:`b = \sqrt{6 /
    \text{fan\_in}}`, the official ``init='kaiming'`` for ReLU), own bias := 0,
    outgoing weights := 0;
  - the next layer's bias absorbs the removed unit's mean contribution,
    :math:`b_{\text{next}} \mathrel{+}= \hat f_i\,W_{\text{out}}[i, :]`,
    when a layer names it as a fourth path:
    ``layers=[("l1/kernel", "l1/bias", "l2/kernel", "l2/bias"), ...]`` (a
    3-tuple skips it);
  - ``inner``'s per-parameter state (Adam's ``mu``/``nu``) := 0 on the
    replaced unit's incoming weights, bias and outgoing weights (not on the
    next bias), Adam's scalar ``count`` kept.

  **Put it last**, with the whole optimiser inside:
  ``continual_backprop(optax.sgd(3e-3), layers=...)``; pass the hidden
  layers' post-activation outputs of this batch (computed before the step)
  as ``update(..., activations=[h1, h2, ...])``, one per layer. Never list
  the output layer.

  Departures from the official code (``lop/algos/gnt.py``, with ``AdamGnT``):

  - **Adam's per-element step count.** AdamGnT also resets a per-element
    step count, so a replaced weight's bias correction starts over; optax's
    Adam has one scalar ``count``, so with zeroed moments a replaced
    weight's first steps are larger, :math:`\alpha(1-\beta_1^k)/\sqrt{1 -
    \beta_2^k}` with the global :math:`k` (about 3 :math:`\alpha` for
    :math:`k \ge 100` at :math:`\beta = (0.9, 0.999)`, decaying as the
    moments fill). Solved by giving ``inner=cl_optax.adam_gnt(lr)``: Adam
    with a params-shaped count, which the reset zeroes with the moments
    (AdamGnT exactly). The official permuted-MNIST and regression runs use
    SGD (no state to reset), and the PPO runs plain Adam without any reset
    (author, issue #10).
  - **Bias absorption.** ``gnt.py`` zeroes the replaced units' running mean
    in ``test_features`` before ``gen_new_features`` reads it, so its
    next-bias correction adds 0; here the bias absorbs :math:`\hat f_i` as
    the paper describes. Give 3-tuples to reproduce the code.
  - Only ``accumulate=True`` (the permuted-MNIST runs); the random
    replacement of ``accumulate=False`` is not offered. At most
    ``max_units`` units per layer per update; the excess is kept in
    :math:`n_l`.

  Args:
    inner: the optimiser (e.g. ``optax.sgd(3e-3)``, the official setting).
    layers: ``(kernel_in, bias or None, kernel_out[, next_bias])`` paths per
      hidden layer (see :func:`cl_optax.unit_resets`).
    replacement_rate: :math:`\rho`; default 1e-6 (permuted MNIST, 3×2000
      units; grid 1e-4, 1e-5, 1e-6). Tuned to the width: a small net needs a
      larger :math:`\rho` to replace anything.
    decay_rate: :math:`\eta`; default 0.99.
    maturity_threshold: :math:`m`; default 100.
    utility: ``"adaptable_contribution"`` (default) or ``"contribution"``.
    max_units: most units replaced per layer per update (static); default 1.
    reinit: initialiser of fresh incoming weights, ``(key, shape, dtype) ->
      array``; default ``jax.nn.initializers.he_uniform()``.
    seed: seed of the PRNG key in the state.

  Under ``optax.inject_hyperparams`` list ``inner``, ``layers``, ``utility``,
  ``max_units``, ``reinit`` and ``seed`` in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`cl_optax.UnitResetsState` (``reset_stats``: one
    :class:`CBPStats` per layer).

  References:
    Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton, *Loss of
    plasticity in deep continual learning*, Nature 632, 2024, Methods
    (continual backpropagation); official code
    ``shibhansh/loss-of-plasticity`` ``lop/algos/gnt.py``, ``cbp.py``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"l1": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
    ...           "l2": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}
    >>> tx = cl_optax.continual_backprop(
    ...     optax.sgd(0.1), layers=[("l1/kernel", "l1/bias", "l2/kernel", "l2/bias")],
    ...     replacement_rate=0.5, maturity_threshold=0)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> h = jnp.array([[1.0, 0.5, 2.0], [3.0, 0.5, 0.0]])  # unit 1 never varies
    >>> updates, state = tx.update(grads, state, params, activations=[h])
    >>> new = optax.apply_updates(params, updates)
    >>> new["l2"]["kernel"][:, 0], new["l2"]["bias"]
    (Array([1., 0., 1.], dtype=float32), Array([0.5], dtype=float32))
  """
  select = cbp_selector(
    replacement_rate, decay_rate, maturity_threshold, utility=utility, max_units=max_units
  )
  reinit = jax.nn.initializers.he_uniform() if reinit is None else reinit
  return unit_resets(
    inner, layers=layers, select=select, reinit=reinit, max_units=max_units, seed=seed
  )


def redo(
  inner: optax.GradientTransformation,
  *,
  layers: Sequence[tuple[str | None, ...]],
  threshold: float = 0.0,
  every: int = 200_000,
  centered: bool = False,
  max_units: int | None = None,
  reinit: Callable[[jax.Array, tuple, Any], jax.Array] | None = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""ReDo (Sokar et al., 2023): recycle dormant units every ``every`` updates.

  :func:`cl_optax.unit_resets` around ``inner`` with
  :func:`cl_optax.redo_selector`: after every ``every``-th update, the units
  of each layer whose normalised mean activation

  .. math::
    s_i = \frac{\mathbb{E}|h_i|}{\frac{1}{n}\sum_k \mathbb{E}|h_k| + 10^{-9}}

  (mean over every axis but the last, so a conv channel is one unit;
  ``centered``: :math:`h - \mathbb{E}h` first) is at most :math:`\tau` are
  recycled: incoming weights := a fresh Xavier-uniform draw (the network's
  own init in Dopamine), bias := 0, outgoing weights := 0; Adam's ``mu`` and
  ``nu`` := 0 on those entries, ``count`` kept (as Dopamine's
  ``weight_recyclers.py`` does). ``max_units=None`` recycles every dormant
  unit, as ReDo does.

  **Put it last**, with the whole optimiser inside:
  ``redo(optax.adam(6.25e-5), layers=..., threshold=0.1, every=1000)``, and
  pass ``activations=[h1, ...]`` (hidden outputs of a statistics batch) to
  ``update``, at least on the steps that recycle (``(step + 1) % every ==
  0``); a step without them recycles nothing.

  Departures from Dopamine: the period counts this transform's updates
  (Dopamine: ``step > 0 and step % reset_period == 0`` of its training step,
  between ``reset_start_step`` and ``reset_end_step``, not offered here); no
  conv→dense mask repetition (layer spec limit of
  :func:`cl_optax.unit_resets`); outgoing weights always zero (Dopamine's
  ``init_method_outgoing='zero'`` default).

  Args:
    inner: the optimiser whose update and state are wrapped.
    layers: ``(kernel_in, bias or None, kernel_out)`` paths per hidden layer
      (never the output layer).
    threshold: :math:`\tau \ge 0`; default 0.0 (Dopamine's
      ``NeuronRecycler``: only exactly dead units; lop's ReDo baseline uses
      0.01).
    every: :math:`F`, the recycle period in updates (static); default
      200 000 (Dopamine's ``reset_period``; lop's baseline: 1000).
    centered: Dopamine's ``sub_mean_score``; default ``False``.
    max_units: most units recycled per layer per recycle (static); ``None``:
      all dormant units.
    reinit: initialiser of fresh incoming weights; default
      ``jax.nn.initializers.xavier_uniform()``.
    seed: seed of the PRNG key in the state.

  Under ``optax.inject_hyperparams`` list ``inner``, ``layers``, ``every``,
  ``centered``, ``max_units``, ``reinit`` and ``seed`` in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`cl_optax.UnitResetsState`.

  References:
    Sokar, Agarwal, Castro & Evci, *The dormant neuron phenomenon in deep
    reinforcement learning*, ICML 2023 (arXiv:2302.12902), Def. 3.1 and
    Alg. 1; official code ``google/dopamine``
    ``dopamine/labs/redo/weight_recyclers.py``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, cl_optax
    >>> params = {"l1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    ...           "l2": {"kernel": jnp.ones((3, 1))}}
    >>> tx = cl_optax.redo(optax.adam(1e-3), layers=[("l1/kernel", "l1/bias", "l2/kernel")],
    ...                    threshold=0.1, every=1)
    >>> state = tx.init(params)
    >>> h = jnp.array([[1.0, 0.0, 2.0]])  # unit 1 is dormant
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> updates, state = tx.update(grads, state, params, activations=[h])
    >>> optax.apply_updates(params, updates)["l2"]["kernel"][:, 0]
    Array([1., 0., 1.], dtype=float32)
  """
  _checks.check_hyperparameter(threshold, transform="redo", name="threshold", low=0.0)
  _checks.check_hyperparameter(every, transform="redo", name="every", low=1, integer=True)
  select = redo_selector(threshold, every=every, centered=centered)
  reinit = jax.nn.initializers.xavier_uniform() if reinit is None else reinit
  width = 2**31 - 1 if max_units is None else max_units
  return unit_resets(inner, layers=layers, select=select, reinit=reinit, max_units=width, seed=seed)
