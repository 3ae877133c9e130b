"""The adapter LM benchmark (benchmarks/lm_adapters.py) end to end at a tiny size."""

import json

import numpy as np
import pytest

from benchmarks import lm_adapters

pytestmark = pytest.mark.slow

TINY = "--seeds 1 --d 16 --layers 1 --heads 2 --ff 32 --length 16 --batch 4 --rank 2"
TINY += " --pretrain-steps 2 --steps 2 --impt-batches 1 --cov-batches 1 --max-bytes 20000"


def test_tiny_run_writes_the_table_json_and_plots(tmp_path):
  argv = [*TINY.split(), "--methods", "adam,olora,inflora", "--out", str(tmp_path)]
  doc = lm_adapters.main(argv)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["corpora"] == ["general", "encodings", "asyncio", "email-docs", "unittest"]
  for m in ("adam", "olora", "inflora"):
    mat = np.asarray(saved["matrices"][m][0])
    assert mat.shape == (5, 5) and np.all(np.isfinite(mat))
  s = doc["summary"]
  # the adapters train a small share of the parameters; InfLoRA only lora_b
  assert s["inflora"]["trainable"] * 2 == s["olora"]["trainable"] < s["adam"]["trainable"]
  assert "| inflora |" in (tmp_path / "table.md").read_text()
  assert all((tmp_path / p).exists() for p in ("loss_matrices.png", "forgetting_vs_speed.png"))
