"""The protocol options that reproduce an official code base's settings (issue 13):
the A-GEM code's initialisation, its EWC Fisher and MAS importance, van de Ven's
per-seed digit-to-task assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import continual
from benchmarks.continual import mnist_streams
from benchmarks.continual.methods import agem_code

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)  # noqa: E731


def test_agem_init_is_truncated_normal_01_with_biases_01():
  p = continual.mlp_init(jax.random.key(0), (784, 256, 10), init="agem")
  k = np.asarray(p["layer0"]["kernel"])
  assert np.abs(k).max() <= 0.2 + 1e-6  # redrawn outside 2 std
  assert abs(k.std() - 0.088) < 0.002  # the std of N(0, 0.1) truncated at +-2 std
  assert abs(k.mean()) < 0.002
  for name in ("layer0", "head"):
    assert np.all(np.asarray(p[name]["bias"]) == np.float32(0.1))
  t = continual.mlp_init(jax.random.key(0), (784, 256, 10))  # default: PyTorch's uniform
  assert np.abs(np.asarray(t["layer0"]["kernel"])).max() <= 1 / np.sqrt(784)
  with pytest.raises(ValueError, match="init"):
    continual.mlp_init(jax.random.key(0), (4, 2), init="xavier")


def test_gem_init_is_glorot_uniform_with_zero_biases():
  p = continual.mlp_init(jax.random.key(0), (784, 100, 10), init="gem")
  k, bound = np.asarray(p["layer0"]["kernel"]), np.sqrt(6 / (784 + 100))
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.99 * bound
  assert abs(k.std() - bound / np.sqrt(3)) < 0.002  # the std of U(-a, a) is a / sqrt(3)
  assert np.abs(np.asarray(p["head"]["kernel"])).max() <= np.sqrt(6 / 110)
  for name in ("layer0", "head"):
    assert np.all(np.asarray(p[name]["bias"]) == 0.0)


def _loss(params, x, y, task_ids, weights=None):
  return optax.softmax_cross_entropy_with_integer_labels(continual.mlp_apply(params, x), y).mean()


def test_agem_code_running_fisher_and_minmax():
  """Every 10th step F <- 0.1 F + 0.09 * (sum of the squared minibatch gradients since the
  last flush); the consolidated importance is min-max normalised over all leaves."""
  params = continual.mlp_init(jax.random.key(1), (6, 5, 3))
  aux = agem_code._fisher_init(continual.AuxInit(2, (6,), {}, 3, params))
  hp = {"fisher_every": 10, "fisher_decay": 0.9}
  rng = np.random.default_rng(0)
  squares = []
  for i in range(12):
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 4))
    s = continual.Step(params, x, y, jnp.int32(0), 2, aux, None, _loss, hp, None, None, None)
    _, aux = agem_code._fisher_step(s)
    squares.append(jax.tree.map(jnp.square, jax.grad(_loss)(params, x, y, None)))
  total = lambda sq: jax.tree.map(lambda *a: sum(a), *sq)  # noqa: E731
  jax.tree.map(close, aux["running"], jax.tree.map(lambda t: 0.09 * t, total(squares[:9])))
  jax.tree.map(close, aux["tmp"], total(squares[9:]))
  norm = jax.tree.leaves(agem_code.minmax_normalise(aux["running"]))
  assert min(float(x.min()) for x in norm) == 0.0
  assert abs(max(float(x.max()) for x in norm) - 1.0) < 1e-6
  assert int(aux["step"]) == 12


def test_agem_code_mas_importance_is_mean_abs_minibatch_gradient():
  params = continual.mlp_init(jax.random.key(2), (6, 5, 3))
  xs = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 6)), jnp.float32)
  fn = continual.mlp_apply
  got = agem_code.mas_importance(fn, params, xs)
  grads = [jax.grad(lambda p, x=x: jnp.sum(fn(p, x) ** 2))(params) for x in xs]
  want = jax.tree.map(lambda *g: sum(jnp.abs(a) for a in g) / 12, *grads)
  jax.tree.map(close, got, want)


def test_split_mnist_2019_assigns_digits_to_tasks_per_seed(monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.random((200, 4, 4)).astype(np.float32)
  y = np.repeat(np.arange(10), 20)
  ds = mnist_streams.streams.Dataset(x, y, x, y)
  monkeypatch.setattr(mnist_streams, "_mnist", lambda path: ds)

  make = continual.PRESETS["split-mnist-2019"].stream
  groups = {s: [tuple(t.classes.tolist()) for t in make(None, "task", s)] for s in range(3)}
  for g in groups.values():
    assert sorted(c for pair in g for c in pair) == list(range(10))
  assert len({tuple(g) for g in groups.values()}) == 3  # a different assignment per seed
  plain = continual.PRESETS["split-mnist"].stream(None, "task", 0)
  assert [tuple(t.classes.tolist()) for t in plain] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def test_isolation_presets_give_each_permutation_a_head_and_caps_subsample(monkeypatch):
  """wsn-pmnist / hat-pmnist: permuted MNIST task-IL, task t reads columns 10t..10t+9;
  --n-train / --n-test (cap_stream) keep a seeded random training subset, the first tests."""
  rng = np.random.default_rng(0)
  x = rng.random((300, 4, 4)).astype(np.float32)
  y = np.repeat(np.arange(10), 30)
  monkeypatch.setattr(
    mnist_streams, "_mnist", lambda path: mnist_streams.streams.Dataset(x, y, x, y)
  )
  stream = continual.PRESETS["hat-pmnist"].stream(None, "task", 0)
  assert stream.scenario == "task" and stream.n_outputs == 100 and len(stream) == 10
  np.testing.assert_array_equal(stream.columns, np.arange(100).reshape(10, 10))
  assert continual.PRESETS["wsn-pmnist"].bias is False
  capped = mnist_streams.cap_stream(stream, 50, 20, seed=1)
  for t in (0, 3):
    xt, yt = capped[t].train()
    full_x, full_y = stream[t].train()
    assert len(yt) == 50 and len({r.tobytes() for r in full_x}.intersection(
      r.tobytes() for r in xt)) == 50  # fmt: skip
    np.testing.assert_array_equal(capped[t].test()[1], stream[t].test()[1][:20])
  assert not np.array_equal(
    capped[0].train_index, mnist_streams.cap_stream(stream, 50, 20, 2)[0].train_index
  )
  assert mnist_streams.cap_stream(stream, None, None, 0) is stream


def test_der_domain_presets_permute_every_task_and_draw_one_angle_per_task(monkeypatch):
  """der-pmnist: 20 tasks, every one permuted, all training examples; der-rmnist: 20 angles
  drawn from U(0, 180) with the seed (mammoth's Rotation), the same for the same seed."""
  rng = np.random.default_rng(0)
  x = rng.random((60, 4, 4)).astype(np.float32)
  y = np.repeat(np.arange(10), 6)
  monkeypatch.setattr(
    mnist_streams, "_mnist", lambda path: mnist_streams.streams.Dataset(x, y, x, y)
  )
  pm = continual.PRESETS["der-pmnist"]
  assert (pm.batch_size, pm.epochs, pm.hidden, pm.lr["sgd"]) == (128, 1, (100, 100), 0.2)
  stream = pm.stream(None, "domain", 0)
  assert len(stream) == 20 and stream.scenario == "domain"
  for t in (0, 19):
    xt, yt = stream[t].train()
    assert len(yt) == 60 and not np.array_equal(xt.reshape(60, -1), x.reshape(60, -1))

  def angles(seed):
    s = continual.PRESETS["der-rmnist"].stream(None, "domain", seed)
    return np.array([float(t.name.split()[1]) for t in s.tasks])

  a0 = angles(0)
  expected = np.random.default_rng(0).uniform(0.0, 180.0, size=20)
  np.testing.assert_allclose(a0, expected, atol=0.05)  # the names print one decimal
  assert a0.min() >= 0.0 and a0.max() < 180.0 and np.ptp(a0) > 90.0  # not GEM's ordered bins
  np.testing.assert_array_equal(a0, angles(0))
  assert not np.allclose(a0, angles(1))
