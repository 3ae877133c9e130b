r"""Shrink and perturb: :func:`shrink_perturb` (Ash & Adams, at a boundary) and :func:`param_noise`
(Dohare et al.'s per-step perturbation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cl_optax import _checks, _debug, _trees, _writes

_TRANSFORM = "shrink_perturb"
_NOISE = "param_noise"


class ShrinkPerturbState(NamedTuple):
  r"""State of :func:`shrink_perturb`.

  Attributes:
    shrink_perturb_write: the scheduled write :math:`\lambda\theta +
      \sigma\theta_{\text{fresh}}` (a :class:`cl_optax.PendingWrite`), emitted
      and cleared by the next ``update``.
    shrink_perturb_inner: the state of ``inner`` (``()`` without one),
      restarted (``inner.init``) on the step the write lands.
    shrink_perturb_shrink: :math:`\lambda`, float32, refreshed from the
      factory argument at every update (so ``inject_hyperparams`` reaches it).
    shrink_perturb_perturb: :math:`\sigma`, float32, likewise.
  """

  shrink_perturb_write: _writes.PendingWrite
  shrink_perturb_inner: Any
  shrink_perturb_shrink: jax.Array  # shape=(), float32
  shrink_perturb_perturb: jax.Array  # shape=(), float32

  def consolidate(self, params, **signals) -> ShrinkPerturbState:
    """Schedules the write ``shrink * params + perturb * fresh`` (``fresh=`` is required)."""
    template = self.shrink_perturb_write.write_target
    fresh = _checks.validated_signal(
      signals,
      "fresh",
      template,
      transform=_TRANSFORM,
      what="a fresh initialisation of the parameters, a pytree like params",
    )
    _checks.check_finite(fresh, transform=_TRANSFORM, name="fresh")
    params = _trees.restrict_like(
      template, _trees.unwrap_variables(params), transform=_TRANSFORM, name="params"
    )
    lam, sig = self.shrink_perturb_shrink, self.shrink_perturb_perturb

    def target(t, p, f):
      p32, f32 = jnp.asarray(p, jnp.float32), jnp.asarray(f, jnp.float32)
      return _trees.placed_like(t, (lam * p32 + sig * f32).astype(t.dtype))

    targets = _trees.map_unmasked(target, template, params, fresh)
    return self._replace(
      shrink_perturb_write=_writes.schedule(self.shrink_perturb_write, targets, True)
    )


def shrink_perturb(
  shrink: float = 0.4,
  perturb: float = 0.1,
  *,
  inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Shrink and perturb (Ash & Adams, 2020) at a task boundary: a fresh start that keeps a little.

  At :func:`cl_optax.consolidate` with ``fresh=`` (a freshly initialised copy
  of the parameters, drawn by the user with the model's own initialiser),
  every parameter is set, on the next step, to

  .. math::
    \theta \leftarrow \lambda\,\theta + \sigma\,\theta_{\text{fresh}}

  computed in float32 from the parameters passed to ``consolidate`` and
  written through :mod:`cl_optax`'s boundary writes (the update of that step
  is :math:`t - \theta`, so ``optax.apply_updates`` lands on :math:`t` up to
  one rounding; the gradient of that step is dropped). :math:`\lambda = 1,
  \sigma = 0` is a warm start, :math:`\lambda = 0, \sigma = 1` a fresh
  initialisation.

  **Put it last in the chain** (the write must not be rescaled), and restart
  the optimiser as the paper does, either

  - by wrapping it: ``shrink_perturb(0.4, 0.1, inner=optax.adam(1e-3))``
    replaces ``inner``'s state by ``inner.init(targets)`` on the step the
    write lands (Adam's moments and count from zero: a new optimiser), or
  - by hand: ``optax.chain(optax.adam(1e-3), shrink_perturb())`` and, after
    ``consolidate``, re-``init`` the optimiser part of the chain
    (``state = (tx_opt.init(params), state[1])``) or zero its moments with
    ``optax.tree.map_params``. Without a restart Adam keeps its moments
    (a documented difference from the paper).

  ``cl_optax.apply_pending_writes(params, state)`` applies the write at once
  (evaluation right after the boundary); it clears the write, and with it
  ``inner``'s restart, which happens only on a step that emits a write:
  restart by hand then.

  Departures from the official code (``JordanAsh/warm_start`` ``run.py``):
  there the fresh network is drawn inside the loop; here the caller passes
  it (``fresh=``), so any model library's initialiser works. The official
  code also shrinks-and-perturbs at the very first round; call
  ``consolidate`` before the first step to do the same. Dohare et al.'s
  per-step variant (weight decay, then Gaussian noise) is
  :func:`cl_optax.param_noise`.

  Args:
    shrink: :math:`\lambda \ge 0`; official default 0.4 (``--shrink``).
    perturb: :math:`\sigma \ge 0`; official default 0.1 (``--perturb``).
    inner: optional, the optimiser to wrap and restart at the write (list it
      in ``static_args`` under ``optax.inject_hyperparams``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Ash & Adams, *On warm-starting neural network training*, NeurIPS 2020
    (arXiv:1910.08475), Sec. 4; official code ``JordanAsh/warm_start``
    ``run.py`` (defaults ``--shrink 0.4 --perturb 0.1``, a new optimiser
    each round).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = cl_optax.shrink_perturb(0.5, 0.25, inner=optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> state = cl_optax.consolidate(state, params, fresh={"w": jnp.array([4.0, 0.0])})
    >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)  # gradient dropped
    >>> optax.apply_updates(params, updates)["w"]  # 0.5 * [1, 2] + 0.25 * [4, 0]
    Array([1.5, 1. ], dtype=float32)
  """
  _checks.check_hyperparameter(shrink, transform=_TRANSFORM, name="shrink", low=0.0)
  _checks.check_hyperparameter(perturb, transform=_TRANSFORM, name="perturb", low=0.0)
  wrapped = None if inner is None else optax.with_extra_args_support(inner)

  def init_fn(params):
    plain = _trees.unwrap_variables(params)
    return ShrinkPerturbState(
      shrink_perturb_write=_writes.init_pending(plain),
      shrink_perturb_inner=() if wrapped is None else wrapped.init(params),
      shrink_perturb_shrink=jnp.asarray(shrink, jnp.float32),
      shrink_perturb_perturb=jnp.asarray(perturb, jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args(_TRANSFORM, extra_args)
    if params is None:
      raise ValueError(f"{_TRANSFORM}: update needs `params` (the write lands as target - params).")
    inner_state = state.shrink_perturb_inner
    pending = state.shrink_perturb_write
    if wrapped is not None:
      opt = wrapped
      updates, inner_state = opt.update(updates, inner_state, params, **extra_args)

      def restart(s):
        fresh = opt.init(pending.write_target)
        return jax.tree.map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), fresh, s)

      inner_state = jax.lax.cond(pending.write_pending, restart, lambda s: s, inner_state)
    updates, pending = _writes.emit(
      updates, pending, _trees.unwrap_variables(params), transform=_TRANSFORM
    )
    return updates, ShrinkPerturbState(
      shrink_perturb_write=pending,
      shrink_perturb_inner=inner_state,
      shrink_perturb_shrink=jnp.asarray(shrink, jnp.float32),
      shrink_perturb_perturb=jnp.asarray(perturb, jnp.float32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ParamNoiseState(NamedTuple):
  """State of :func:`param_noise`.

  Attributes:
    param_noise_key: raw ``uint32[2]`` PRNG key, split at every update.
  """

  param_noise_key: jax.Array  # shape=(2,), uint32

  def consolidate(self, params, **signals) -> ParamNoiseState:
    """No boundary rule: the state unchanged."""
    del params, signals
    return self


def param_noise(stddev: float = 1e-5, *, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Gaussian noise added to every parameter at every step (the perturb of Dohare et al.'s S&P).

  .. math::
    u \leftarrow u + \varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, \sigma^2)

  on every entry of every leaf (weights and biases), drawn in float32 and
  added in float32. **Put it after the learning rate** (the noise is not
  scaled by it). With weight decay before the optimiser this is the
  continual shrink-and-perturb of Dohare et al.:

  ``optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(3e-3),
  cl_optax.param_noise(1e-5))``, i.e. :math:`\theta \leftarrow (1 -
  \alpha\,\mathrm{wd})\,\theta - \alpha g + \varepsilon` as PyTorch's coupled
  SGD weight decay followed by the noise (``lop/algos/bp.py``).

  Keys: ``param_noise_key`` starts as ``jax.random.PRNGKey(seed)``; each
  update does ``key, sub = split(key)`` and leaf ``i`` (in tree order, masked
  leaves left out) draws with ``split(sub, n_leaves)[i]``. Non-finite update
  entries stay non-finite. ``optax.add_noise`` is a different thing (annealed
  gradient noise, before the learning rate).

  Args:
    stddev: :math:`\sigma \ge 0`; default 1e-5, the online permuted-MNIST
      setting of Dohare et al. (grid 1e-4, 1e-5, 1e-6, with weight decay
      1e-4 and SGD step 0.003).
    seed: seed of the PRNG key kept in the state (list it in
      ``static_args`` under ``optax.inject_hyperparams``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Dohare et al., *Loss of plasticity in deep continual learning*, Nature
    632, 2024 (the shrink-and-perturb baseline); official code
    ``shibhansh/loss-of-plasticity`` ``lop/algos/bp.py``;
    Ash & Adams, NeurIPS 2020 (shrink and perturb).

  Example:
    >>> import jax.numpy as jnp, optax, cl_optax
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optax.chain(optax.sgd(0.1), cl_optax.param_noise(0.0))
    >>> tx.update({"w": jnp.ones(3)}, tx.init(params), params)[0]["w"]
    Array([-0.1, -0.1, -0.1], dtype=float32)
  """
  _checks.check_hyperparameter(stddev, transform=_NOISE, name="stddev", low=0.0)

  def init_fn(params):
    del params
    return ParamNoiseState(param_noise_key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None, **extra_args):
    _debug.check_extra_args(_NOISE, extra_args)
    del params, extra_args
    key, sub = jax.random.split(state.param_noise_key)
    leaves = _trees.unmasked_leaves(updates)
    leaves = [u for u in leaves if u is not None]
    if not leaves:
      return updates, ParamNoiseState(param_noise_key=key)
    keys = iter(jax.random.split(sub, len(leaves)))
    sigma = jnp.asarray(stddev, jnp.float32)

    def add(u):
      if u is None:
        return u
      eps = sigma * jax.random.normal(next(keys), jnp.shape(u), jnp.float32)
      return (u.astype(jnp.float32) + eps).astype(u.dtype)

    return _trees.map_unmasked(add, updates), ParamNoiseState(param_noise_key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
