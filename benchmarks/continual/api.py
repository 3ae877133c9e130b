"""The runner from Python, on your own stream and model: :func:`run_stream`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.continual.nnx_models import make_model
from benchmarks.continual.runner import Config, run_method
from cl_optax import streams


def run_stream(
  stream: streams.Stream,
  model: Any,
  methods: Sequence[str],
  *,
  seeds: Sequence[int] = (0,),
  optimizer: str = "adam",
  lr: float | None = None,
  batch_size: int = 32,
  epochs: int | None = 1,
  iters: int | None = None,
  hp: dict | None = None,
  hidden: tuple[int, ...] = (100, 100),
  progress: bool = True,
  on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
  """Trains each method on ``stream``, a fresh model per seed; returns the CLI's records.

  Args:
    stream: a :class:`cl_optax.streams.Stream` (e.g. ``streams.split(x, y, ...)``
      over your arrays).
    model: an ``nnx.Module`` factory ``rngs -> module`` mapping a batch
      ``[n, *x.shape[1:]]`` to logits ``[n, stream.n_outputs]`` (name its output
      layer ``head``), a registry name (``"mlp"``, ``"cnn"``) or a model object.
    methods: registered method names (``python -m benchmarks.continual --list``).
    seeds: one run per seed (initialisation, batch order, memory sampling).
    optimizer: the base optimiser, ``"sgd"`` or ``"adam"``.
    lr: its learning rate (default 0.1 for SGD, 1e-3 for Adam).
    batch_size, epochs, iters: the schedule per task (``iters`` wins).
    hp: method hyper-parameters, e.g. ``{"buffer": 200}`` (as ``--hp``).
    hidden: the MLP's widths when ``model="mlp"``.
    progress: progress bars on a terminal, one line per task otherwise.
    on_record: called with each record as soon as its seed is done.

  Returns:
    One record per method and seed: ``acc_matrix`` (R[i][j], accuracy on task j
    after task i), ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``samples_per_s``, ...
  """
  model = make_model(model, tuple(hidden))
  cfg = Config(
    hidden=tuple(hidden), optimizer=optimizer, lr={"sgd": 0.1, "adam": 1e-3},
    batch_size=batch_size, epochs=None if iters else epochs, iters=iters, hp=dict(hp or {}),
    progress=progress, lr_override=lr, scenario=stream.scenario or "", model=model,
  )  # fmt: skip
  records = []
  for name in methods:
    records += run_method(name, lambda seed: stream, cfg, list(seeds), on_record=on_record)
  return records
