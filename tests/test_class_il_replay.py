"""Class-IL replay losses against numpy: ER-ACE, iCaRL's BCE, BiC, X-DER's rewrite, WA's factor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cl_optax
from cl_optax import losses

RNG = np.random.default_rng(0)
Z = RNG.normal(size=(5, 6)).astype(np.float32) * 2
T = RNG.normal(size=(5, 6)).astype(np.float32) * 2
Y = np.array([2, 3, 3, 2, 0])


def _log_softmax(z, mask):
  z = np.where(mask, z.astype(np.float64), -np.inf)
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def test_ace_masks_old_classes_absent_from_the_batch():
  seen = np.array([True, True, True, False, False, False])  # classes 0-2 before this batch
  loss, new_seen = losses.ace_cross_entropy(jnp.asarray(Z), jnp.asarray(Y), jnp.asarray(seen))
  present = np.isin(np.arange(6), Y)
  top = np.max(np.flatnonzero(seen | present))
  active = present | (np.arange(6) >= top)  # {0, 2, 3} and 3.. (AML: index >= max seen)
  assert active.tolist() == [True, False, True, True, True, True]
  want = -np.mean(_log_softmax(Z, active)[np.arange(5), Y])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert new_seen.tolist() == [True, True, True, True, False, False]
  w = np.array([1, 1, 0, 0, 1.0])  # class 3 only in weighted-out rows: it is masked too
  loss_w, _ = losses.ace_cross_entropy(jnp.asarray(Z), jnp.asarray(Y), jnp.asarray(seen), weights=w)
  act_w = np.isin(np.arange(6), Y[w > 0]) | (np.arange(6) >= 3)
  lp = _log_softmax(Z, act_w)[np.arange(5), Y]
  np.testing.assert_allclose(loss_w, -np.sum(w * np.where(w > 0, lp, 0)) / w.sum(), rtol=1e-5)
  g = jax.grad(lambda z: losses.ace_cross_entropy(z, jnp.asarray(Y), jnp.asarray(seen))[0])(Z)
  assert np.all(np.asarray(g)[:, 1] == 0)  # the masked old class gets no gradient


def test_icarl_bce_matches_numpy():
  old = np.array([True, True, False, False, False, False])
  got = losses.icarl_bce(jnp.asarray(Z), jnp.asarray(Y), teacher_logits=T, old_mask=old)
  sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
  q = np.where(old, sig(T), np.eye(6)[Y])
  p = sig(Z)
  want = -np.mean(q * np.log(p) + (1 - q) * np.log(1 - p))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = losses.icarl_bce(jnp.asarray(Z), jnp.asarray(Y))
  np.testing.assert_allclose(
    plain, -np.mean(np.eye(6)[Y] * np.log(p) + (1 - np.eye(6)[Y]) * np.log(1 - p)), rtol=1e-5
  )


def test_bic_loss_weights_and_bias_correction():
  old = np.array([True, True, False, False, False, False])
  seen = np.array([True] * 4 + [False] * 2)
  for task in (1, 3):
    got = losses.bic_loss(Z, jnp.asarray(Y), T, task=task, old_mask=old, seen_mask=seen)
    ce = -np.mean(_log_softmax(Z, seen)[np.arange(5), Y])
    tgt = np.exp(np.where(old, _log_softmax(T / 2, old), -np.inf))
    kd = -np.mean(
      np.sum(
        np.where(old, np.where(old, tgt, 0) * np.where(old, _log_softmax(Z / 2, old), 0), 0), -1
      )
    )
    lam = task / (task + 1)  # the official weighting: distillation grows with the old tasks
    np.testing.assert_allclose(got, lam * kd + (1 - lam) * ce, rtol=1e-5)
  new = np.array([False, False, True, True, False, False])
  q = losses.bias_correct(Z, 0.7, -0.3, new)
  np.testing.assert_allclose(q, np.where(new, 0.7 * Z - 0.3, Z), rtol=1e-6)
  bg = jnp.array([0.7, -0.3])
  fit = losses.bic_bias_loss(bg, Z, jnp.asarray(Y), new, seen)
  want = (
    -np.mean(_log_softmax(np.where(new, 0.7 * Z - 0.3, Z), seen)[np.arange(5), Y]) + 0.05 * 0.09
  )
  np.testing.assert_allclose(fit, want, rtol=1e-5)
  g = jax.grad(losses.bic_bias_loss)(bg, Z, jnp.asarray(Y), new, seen)
  assert g.shape == (2,) and np.all(np.isfinite(g))


def _xder_loop(stored, new, y, block, gamma):
  out = stored.copy()
  for i in range(len(y)):
    t = new[i, block].copy()
    g, m = stored[i, y[i]], t.max()
    if m > g:
      t = t * gamma * g / m
    out[i, block] = t
  return out


def test_xder_logit_update_and_future_constraint_match_loops():
  block = np.array([False, False, True, True, True, True])
  got = losses.xder_logit_update(Z, T, jnp.asarray(Y), block, gamma=0.85)
  np.testing.assert_allclose(got, _xder_loop(Z, T, Y, block, 0.85), rtol=1e-5)
  some = losses.xder_logit_update(Z, T, jnp.asarray(Y), block, where=np.arange(5) < 2)
  np.testing.assert_array_equal(np.asarray(some)[2:], Z[2:])
  own = np.zeros((5, 6), bool)
  own[np.arange(5), Y // 2 * 2] = own[np.arange(5), Y // 2 * 2 + 1] = True
  fut = np.array([False] * 4 + [True] * 2)
  v = np.max(np.where(fut, Z, -np.inf), 1) + 0.3 - np.max(np.where(own, Z, -np.inf), 1)
  want = v[v > 0].mean() if (v > 0).any() else 0.0
  got = losses.xder_future_constraint(Z, own, fut, margin=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(losses.xder_future_constraint(Z, own, np.zeros(6, bool))) == 0.0


def test_weight_align_factor_and_boundary_write():
  params = {
    "body": {"kernel": jnp.ones((3, 4))},
    "head": {"kernel": jnp.asarray(T[:4]), "bias": jnp.ones(6)},
  }
  old = np.array([True] * 4 + [False] * 2)
  new = ~old
  w, m, gamma = cl_optax.weight_align(params, "head/kernel", old_classes=old, new_classes=new)
  norms = np.linalg.norm(T[:4], axis=0)
  want = norms[old].mean() / norms[new].mean()  # old / new: shrinks larger new columns
  np.testing.assert_allclose(gamma, want, rtol=1e-5)
  tx = optax.chain(optax.sgd(0.1), cl_optax.boundary_writes())
  state = cl_optax.consolidate(tx.init(params), params, writes=w, write_mask=m)
  out, _ = cl_optax.apply_pending_writes(params, state)
  np.testing.assert_allclose(out["head"]["kernel"], np.where(new, T[:4] * want, T[:4]), rtol=1e-5)
  np.testing.assert_array_equal(out["head"]["bias"], params["head"]["bias"])  # bias untouched
  np.testing.assert_array_equal(out["body"]["kernel"], params["body"]["kernel"])
  new_norms = np.linalg.norm(np.asarray(out["head"]["kernel"]), axis=0)
  np.testing.assert_allclose(new_norms[new].mean(), new_norms[old].mean(), rtol=1e-5)
