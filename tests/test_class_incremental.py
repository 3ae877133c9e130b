"""The runner in class-IL: memory losses over the classes active now, the replay and
distillation methods, any Flax NNX model, progress lines in logs, the README's own-model
snippet."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cl_optax
from benchmarks import continual
from benchmarks.continual import progress, run_stream, trainer
from benchmarks.continual.nnx_models import NNXModel
from cl_optax import streams

pytestmark = pytest.mark.slow  # end-to-end runs of the benchmark runner


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------- memory losses read the classes active now


def _identity(params, x):
  del params
  return x  # the inputs are the logits


def test_class_il_memory_loss_competes_with_the_classes_active_now():
  """A task-0 example replayed while training task 1 (class-IL, one shared head): its
  cross-entropy runs over all four classes seen so far, so a high logit of a new class
  costs. Over its own task's columns alone (the old rule, `valid[task_ids]`) it would be
  log 2 whatever the new classes' logits: replay would not stop them taking the example."""
  columns = jnp.tile(jnp.arange(4), (2, 1))
  valid = jnp.array([[True, True, False, False], [True, True, True, True]])
  x = jnp.array([[0.0, 0.0, 5.0, 0.0]])
  y, task_ids = jnp.array([0]), jnp.array([0])
  loss = trainer.task_loss(_identity, columns, valid, jnp.int32(1))(None, x, y, task_ids)
  want = optax.softmax_cross_entropy_with_integer_labels(x, y)[0]  # over all four classes
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(loss) > 5.0 > np.log(2.0) + 1.0
  # while training task 0 the same example only sees classes 0 and 1
  loss0 = trainer.task_loss(_identity, columns, valid, jnp.int32(0))(None, x, y, task_ids)
  np.testing.assert_allclose(loss0, np.log(2.0), rtol=1e-6)


def test_task_il_memory_loss_keeps_each_examples_own_head():
  columns = jnp.array([[0, 1], [2, 3]])
  valid = jnp.ones((2, 2), bool)
  x = jnp.array([[0.0, 1.0, 9.0, 9.0], [0.0, 0.0, 0.0, 3.0]])
  y, task_ids = jnp.array([1, 1]), jnp.array([0, 1])
  loss = trainer.task_loss(_identity, columns, valid, jnp.int32(1))(None, x, y, task_ids)
  want = optax.softmax_cross_entropy_with_integer_labels(
    jnp.array([[0.0, 1.0], [0.0, 3.0]]), y
  ).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-6)


# ----------------------------------------- replay methods remember in class-IL


def _blobs(seed=0, n=64, d=6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (4, d))
  y = np.repeat(np.arange(4), n // 4)
  return (centres[y] + rng.normal(0, 0.5, (n, d))).astype(np.float32), y


def _class_il(name, hp=None):
  x, y = _blobs(n=96)
  stream = streams.split(x, y, classes_per_task=2, scenario="class", seed=0)
  (r,) = run_stream(stream, "mlp", [name], optimizer="sgd", lr=0.1, batch_size=4, epochs=5,
                    hidden=(16,), hp=hp, progress=False)  # fmt: skip
  return np.asarray(r["acc_matrix"])


@pytest.fixture(scope="module")
def sgd_class_il():
  return _class_il("sgd")


@pytest.mark.parametrize("name", ["er", "derpp", "agem", "gem"])
def test_replay_methods_remember_the_first_task_in_class_il(name, sgd_class_il):
  """Class-IL, two tasks: plain SGD keeps 60 % of the first task; the replay methods
  (A-GEM and GEM with their memory loss over the classes active now) all of it."""
  hp = {"memory_per_task": 8, "memory_batch": 8} if name in ("agem", "gem") else {"buffer": 32}
  R = _class_il(name, hp)
  assert R[1, 0] > sgd_class_il[1, 0] + 0.3, (name, R, sgd_class_il)


# ------------------------------------------------------------ any Flax NNX model


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x)))


def test_nnx_model_params_are_a_plain_dict_with_a_head():
  model = NNXModel(_Net)
  params = model.init(jax.random.key(0), (6,), 4)
  assert isinstance(params, dict) and set(params) == {"hidden", "head"}
  labels = model.is_head(params)
  assert labels["head"]["kernel"] and not labels["hidden"]["kernel"]
  assert model.apply(params, jnp.ones((3, 6))).shape == (3, 4)
  with pytest.raises(ValueError, match=r"the stream needs logits \[2, 5\]"):
    NNXModel(_Net).init(jax.random.key(0), (6,), 5)


def test_cnn_model_trains_images():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 24)
  x = (rng.normal(0, 0.3, (96, 8, 8)) + y[:, None, None] * 0.5).astype(np.float32)
  stream = streams.split(x, y, classes_per_task=2, scenario="task", seed=0)
  (r,) = run_stream(stream, "cnn", ["er"], batch_size=8, epochs=2, hp={"buffer": 16},
                    progress=False)  # fmt: skip
  assert r["model"] == "cnn" and np.asarray(r["acc_matrix"]).shape == (2, 2)
  assert r["acc"] > 0.6, r["acc_matrix"]


def test_cnn_takes_flat_square_pixels():
  """The digits are 64 flat pixels: the registry's cnn sees them as 8x8 images."""
  model = continual.make_model("cnn")
  params = model.init(jax.random.key(0), (64,), 10)
  assert model.apply(params, jnp.ones((3, 64))).shape == (3, 10)
  assert model.layer_inputs(params, jnp.ones((3, 64)))["conv1"]["kernel"].patches.shape == (
    3 * 8 * 8,
    9,
  )
  with pytest.raises(ValueError, match="square number of flat pixels"):
    continual.make_model("cnn").init(jax.random.key(0), (10,), 4)


def test_ncl_kfac_names_the_mlp():
  x, y = _blobs()
  stream = streams.split(x, y, classes_per_task=2, scenario="task", seed=0)
  with pytest.raises(ValueError, match="needs the MLP"):
    run_stream(stream, _Net, ["ncl_kfac"], progress=False)


class _OwnNames(nnx.Module):
  """Layer names unlike the runner's MLP: a conv, `fc1`, a list of blocks, `head`."""

  def __init__(self, rngs, n_out=4):
    self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(12, 12, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(12, 12, rngs=rngs)])
    self.head = nnx.Linear(12, n_out, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv(x.reshape(x.shape[0], 3, 2, 1))).reshape(x.shape[0], -1)  # 3x2x2
    h = nnx.relu(self.fc1(h))
    for block in self.blocks:
      h = nnx.relu(block(h))
    return self.head(h)

  @staticmethod
  def trunk(model, params, x):  # fc1's inputs, by hand
    conv = nnx.merge(model.graph[0], params, model.graph[1]).conv
    return (nnx.relu(conv(x.reshape(x.shape[0], 3, 2, 1))).reshape(x.shape[0], -1),)


def test_nnx_layer_inputs_at_each_kernels_path():
  model = NNXModel(_OwnNames)
  params = model.init(jax.random.key(0), (6,), 4)
  x = jax.random.normal(jax.random.key(1), (5, 6))
  reps = model.layer_inputs(params, x)
  assert list(reps) == ["conv", "fc1", "blocks", "head"]  # in the order of the forward pass
  conv = reps["conv"]["kernel"]
  assert isinstance(conv, cl_optax.ConvRepresentations) and conv.kernel_shape == (3, 3, 1, 2)
  assert conv.patches.shape == (5 * 3 * 2, 3 * 3 * 1)  # one row per output position
  np.testing.assert_allclose(reps["fc1"]["kernel"], _OwnNames.trunk(model, params, x)[0])
  assert reps["blocks"][0]["kernel"].shape == reps["head"]["kernel"].shape == (5, 12)
  labels = model.layer_labels(params)
  assert labels["fc1"]["kernel"] and labels["blocks"][0]["kernel"] and labels["conv"]["kernel"]
  assert not labels["fc1"]["bias"] and not labels["conv"]["bias"]


def test_gpm_trains_an_nnx_model_with_its_own_layer_names():
  """Every kernel projected at full energy, biases frozen: task 0's accuracy does not move."""
  x, y = _blobs(n=256)
  stream = streams.split(x, y, classes_per_task=2, scenario="domain", seed=0)
  hp = {"samples": 200, "thresholds": [1.0], "project_head": True}
  net = lambda rngs: _OwnNames(rngs, n_out=2)  # noqa: E731  domain-IL: one 2-way head
  (r,) = run_stream(stream, net, ["gpm"], optimizer="sgd", epochs=2, hp=hp, progress=False)
  R = np.asarray(r["acc_matrix"])
  assert R[0, 0] > 0.6 and R[1, 0] == R[0, 0], R


def test_gpm_names_what_a_model_object_lacks():
  x, y = _blobs()
  stream = streams.split(x, y, classes_per_task=2, scenario="task", seed=0)
  model = continual.MLP((8,))

  class Plain:  # init / apply / is_head only
    name = "plain"
    init, apply, is_head = model.init, staticmethod(model.apply), staticmethod(model.is_head)

  with pytest.raises(ValueError, match=r"has no layer_inputs\(params, x\)"):
    run_stream(stream, Plain(), ["gpm"], progress=False)


# ----------------------------------------------------------------- progress


def test_progress_is_one_line_per_task_off_a_terminal(capsys, monkeypatch):
  monkeypatch.setattr(progress, "on_terminal", lambda: False)
  x, y = _blobs()
  stream = streams.split(x, y, classes_per_task=2, scenario="class", seed=0)
  run_stream(stream, "mlp", ["sgd"], seeds=[3], hidden=(8,), batch_size=8)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 2, err
  assert re.fullmatch(r"\s*sgd seed 3 task 1/2: \d+\.\d s", lines[0]), lines
  assert "\r" not in err and "%" not in err


# ------------------------------------------------------- the README snippet


def test_readme_own_model_snippet_runs(capsys):
  text = README.read_text()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "run_stream(" in b]
  assert len(blocks) == 1, "README: one python block calls run_stream"
  assert len(blocks[0].strip().splitlines()) <= 20
  exec(compile(blocks[0], "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "er" in out and "forgetting" in out


# ------------------------------------------------ the papers' settings per buffer


def test_settings_by_buffer_size():
  """The DER code's seq-mnist settings depend on the buffer: --hp buffer=N picks them."""
  assert continual.settings("seq-mnist", "class", "er", 200) == {"buffer": 500, "lr": 0.01,
                                                                  "memory_batch": 10}  # fmt: skip
  assert continual.settings("seq-mnist", "class", "er")["lr"] == 0.1  # the row's buffer, 500
  assert continual.settings("seq-mnist", "class", "gem", 200)["memory_per_task"] == 40
  with pytest.raises(ValueError, match=r"buffers \[200, 500\]; got 300"):
    continual.settings("seq-mnist", "class", "derpp", 300)
