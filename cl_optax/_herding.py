r"""iCaRL's exemplar selection and classifier: herding, class means, nearest mean of exemplars.

Feature-space helpers for a class-incremental memory: :func:`herding_select`
ranks a class's examples so that the running mean of the first ``k`` stays
closest to the class mean (the order :func:`cl_optax.replay.fill` stores and
:func:`cl_optax.replay.shrink` keeps), :func:`class_means` and
:func:`nme_predict` are iCaRL's nearest-mean-of-exemplars classifier. Features
are whatever the user's network gives before its head; all three are
jittable with static sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def herding_select(
  features: jax.Array, num: int, *, where: jax.Array | None = None, normalize: bool = True
) -> tuple[jax.Array, jax.Array]:
  r"""iCaRL's herding: the ``num`` examples whose running mean tracks the class mean.

  With :math:`\phi_i` the (L2-normalised, by default) features of one class's
  examples and :math:`\mu` their mean, the :math:`k`-th pick is

  .. math::
    p_k = \arg\min_{i \notin \{p_1..p_{k-1}\}} \Big\lVert \mu - \frac{1}{k}
      \Big(\phi_i + \sum_{j<k} \phi_{p_j}\Big) \Big\rVert ,

  Rebuffi et al. 2017, Alg. 4, in the greedy form of mammoth
  ``utils/buffer.py`` ``icarl_replay`` (:math:`\mu` the mean of the normalised
  features, not re-normalised; an example is picked at most once). The
  official Theano code's loop (``w ← w + μ − φ_j``, ``argmax ⟨w, φ⟩``) is the
  same ranking where it does not revisit an example; it stops after 1000
  iterations, this one after ``num``.

  Args:
    features: ``[n, d]`` features of one class's candidates.
    num: how many to rank (static; at most ``n``).
    where: optional bool ``[n]``: the candidates (padding rows ``False``).
    normalize: L2-normalise each feature first (iCaRL, mammoth).

  Returns:
    ``(indices, valid)``: int32 ``[num]`` picks in order, and bool ``[num]``,
    ``False`` past the number of candidates.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> f = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> idx, ok = cl_optax.replay.herding_select(f, 2, normalize=False)
    >>> idx.tolist(), ok.tolist()  # mean (2/3, 2/3): [1, 1] first, then a tie at index 0
    ([2, 0], [True, True])
  """
  features = jnp.asarray(features)
  if features.ndim != 2 or not 0 < int(num) <= features.shape[0]:
    raise ValueError(
      f"replay.herding_select: features must be [n, d] with 0 < num <= n; got "
      f"{features.shape} and num={num}."
    )
  phi = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  phi = _normalize(phi) if normalize else phi
  ok = jnp.ones(phi.shape[0], jnp.bool_) if where is None else jnp.asarray(where, jnp.bool_)
  mu = jnp.sum(jnp.where(ok[:, None], phi, 0.0), 0) / jnp.maximum(jnp.sum(ok), 1)

  def pick(k, carry):
    running, free, idx = carry
    dist = jnp.linalg.norm(mu - (running + phi) / (k + 1), axis=-1)
    j = jnp.argmin(jnp.where(free, dist, jnp.inf))
    return running + phi[j], free.at[j].set(False), idx.at[k].set(j)

  init = (jnp.zeros_like(mu), ok, jnp.zeros((int(num),), jnp.int32))
  _, _, idx = jax.lax.fori_loop(0, int(num), pick, init)
  return idx, jnp.arange(int(num)) < jnp.sum(ok)


def class_means(
  features: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  where: jax.Array | None = None,
  normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
  r"""Per-class mean of (normalised) features, re-normalised: iCaRL's :math:`\mu_y`.

  :math:`\mu_y = \mathrm{normalise}\big(\frac{1}{|P_y|}\sum_{p \in P_y}
  \hat\phi(p)\big)` over the exemplars :math:`P_y` of class :math:`y`
  (Rebuffi et al. 2017, Alg. 1), with :math:`\hat\phi` the L2-normalised
  features (``normalize=False``: raw features, no re-normalisation). The
  official code also averages the features of horizontally flipped images;
  pass those rows too if wanted (not for digits).

  Args:
    features: ``[n, d]`` features, e.g. of the memory's items under the
      current network.
    labels: int ``[n]`` their classes.
    num_classes: :math:`C` (static).
    where: optional bool ``[n]`` (e.g. :func:`cl_optax.replay.filled`).
    normalize: normalise features and means (iCaRL).

  Returns:
    ``(means, present)``: ``[C, d]`` means (0 for an absent class) and bool
    ``[C]``, the classes with at least one example.
  """
  phi = jnp.asarray(features)
  phi = phi.astype(jnp.promote_types(phi.dtype, jnp.float32))
  phi = _normalize(phi) if normalize else phi
  ok = jnp.ones(phi.shape[0], jnp.bool_) if where is None else jnp.asarray(where, jnp.bool_)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=phi.dtype) * ok[:, None]
  count = jnp.sum(onehot, 0)
  means = (onehot.T @ phi) / jnp.maximum(count, 1)[:, None]
  return (_normalize(means) if normalize else means), count > 0


def nme_predict(
  features: jax.Array,
  means: jax.Array,
  *,
  class_mask: jax.Array | None = None,
  normalize: bool = True,
) -> jax.Array:
  r"""Nearest mean of exemplars: :math:`\hat y = \arg\min_y \lVert \hat\phi(x) - \mu_y \rVert^2`.

  iCaRL's classifier (Rebuffi et al. 2017, Alg. 1) over the classes of
  ``class_mask`` (e.g. the ``present`` of :func:`class_means`). The official
  code takes the argmin over every column, unseen classes with a zero mean
  included (one wins when all seen means are further than 1); here masked
  classes never win.

  Args:
    features: ``[n, d]`` features of the inputs to classify.
    means: ``[C, d]`` class means (:func:`class_means`).
    class_mask: optional bool ``[C]``: the classes that may be predicted.
    normalize: L2-normalise the features first (as :func:`class_means`).

  Returns:
    int32 ``[n]`` predicted classes.

  Example:
    >>> import jax.numpy as jnp, cl_optax
    >>> means, present = cl_optax.replay.class_means(
    ...   jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([0, 2]), 3)
    >>> cl_optax.replay.nme_predict(jnp.array([[0.1, 1.0], [3.0, 0.5]]), means,
    ...   class_mask=present).tolist()
    [2, 0]
  """
  phi = jnp.asarray(features)
  phi = phi.astype(jnp.promote_types(phi.dtype, jnp.float32))
  phi = _normalize(phi) if normalize else phi
  dist = jnp.sum(jnp.square(phi[:, None, :] - means[None, :, :]), axis=-1)
  if class_mask is not None:
    dist = jnp.where(jnp.asarray(class_mask, jnp.bool_)[None, :], dist, jnp.inf)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)
