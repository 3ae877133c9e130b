"""Continual-learning benchmark: a stream x methods -> accuracy matrices, table, JSON, plots.

  python -m benchmarks.continual                                  # split digits, every method
  python -m benchmarks.continual --stream pmnist-agem --methods sgd --seeds 5 --data DIR
  python -m benchmarks.continual --stream split-mnist --scenario class --methods adam,soft_mask

Each task trains in ONE jitted `lax.scan` over its batches; a method's end-of-task
work (importance estimation, `cl_optax.consolidate`) runs between tasks. Results: a
table in the terminal, `results.jsonl` (one line per method and seed, with the full
accuracy matrix and samples/s), and PNG plots (accuracy-matrix heatmap per method;
average accuracy vs tasks seen).

Modules, by role: `model` (the MLP and its per-head forward passes), `registry`
(`Method` and what its hooks get), `methods/` (one module per family: entries and
hooks), `protocols` (presets), `paper_settings` (the papers' per-(preset, method)
settings), `trainer` (`make_train`: a task's jitted scan, `task_loss`), `evaluation`
(`make_eval`, the test sets), `runner` (`run_method`: a seed's steps), `seed_state`
(one seed's state), `resilience` (checkpoints, divergence), `report` (table, plots),
`cli`, `nnx_models` (any Flax NNX
module; the `--model` registry), `api` (`run_stream`: your stream, your model factory,
method names -> records).
Add a method with one module in `methods/` (see benchmarks/ADDING_METHODS.md).
"""

from benchmarks.continual import methods  # noqa: F401  registers every method
from benchmarks.continual.api import run_stream
from benchmarks.continual.cli import main
from benchmarks.continual.evaluation import make_eval
from benchmarks.continual.model import (
  MLP,
  Heads,
  head_logits,
  is_head,
  make_heads,
  mlp_apply,
  mlp_init,
  mlp_layer_inputs,
  mlp_layer_names,
  mlp_tapped,
  xent,
)
from benchmarks.continual.nnx_models import MODELS, NNXModel, make_model
from benchmarks.continual.paper_settings import SETTINGS, settings
from benchmarks.continual.protocols import PRESETS, Preset
from benchmarks.continual.registry import (
  BASES,
  METHODS,
  AuxInit,
  Hyper,
  Method,
  Step,
  TaskEnd,
  register,
)
from benchmarks.continual.report import results_table, save_plots
from benchmarks.continual.runner import Config, run_method
from benchmarks.continual.trainer import make_train, task_loss

__all__ = [
  "BASES", "METHODS", "MLP", "MODELS", "PRESETS", "SETTINGS", "AuxInit", "Config", "Heads",
  "Hyper", "Method", "NNXModel", "Preset", "Step", "TaskEnd", "head_logits", "is_head", "main",
  "make_eval", "make_heads", "make_model", "make_train", "mlp_apply", "mlp_init",
  "mlp_layer_inputs", "mlp_layer_names", "mlp_tapped", "register", "results_table",
  "run_method", "run_stream", "save_plots", "settings", "task_loss", "xent",
]  # fmt: skip
