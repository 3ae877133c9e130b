"""The papers' per-method settings on each protocol: `SETTINGS` and :func:`settings`."""

from __future__ import annotations


def _rows(presets, methods, settings: dict) -> dict:
  return {(p, m): settings for p in presets for m in methods}


_AGEM_PMNIST = ("pmnist-agem", "pmnist-agem-1k")
_GEM_MNIST = ("pmnist-gem", "rmnist-gem")
_SPLIT = ("split-mnist", "split-digits")

# DER (Buzzega et al. 2020), seq-MNIST: the official code's best_args.py (aimagelab/mammoth
# utils/best_args.py, 'seq-mnist'), per buffer size. A-GEM and GEM there keep one buffer for
# all tasks; here a ring per task of buffer / 5. GEM's gamma is its strength. LwF: lr 0.03,
# alpha 1, T 2 (mammoth also uses weight decay 5e-4 and a head warm-up, not reproduced).
# Online EWC: lambda 90, gamma 1 (strength = 2 lambda); SI: c 1 (strength = 2c), xi 0.9.
_SEQ_MNIST = {
  ("seq-mnist", "er"): {"buffer": 500, "by_buffer": {
    200: {"lr": 0.01, "memory_batch": 10}, 500: {"lr": 0.1, "memory_batch": 10}}},
  # ER-ACE: no seq-MNIST setting published; ER's, so that the two differ only in the loss
  ("seq-mnist", "er_ace"): {"buffer": 500, "by_buffer": {
    200: {"lr": 0.01, "memory_batch": 10}, 500: {"lr": 0.1, "memory_batch": 10}}},
  ("seq-mnist", "der"): {"buffer": 500, "by_buffer": {
    200: {"lr": 0.03, "memory_batch": 10, "alpha": 0.2},
    500: {"lr": 0.03, "memory_batch": 128, "alpha": 1.0}}},
  ("seq-mnist", "derpp"): {"buffer": 500, "by_buffer": {
    200: {"lr": 0.03, "memory_batch": 128, "alpha": 0.2, "beta": 1.0},
    500: {"lr": 0.03, "memory_batch": 10, "alpha": 1.0, "beta": 0.5}}},
  ("seq-mnist", "agem"): {"buffer": 500, "lr": 0.1, "memory_batch": 128, "by_buffer": {
    200: {"memory_per_task": 40}, 500: {"memory_per_task": 100}}},
  ("seq-mnist", "gem"): {"buffer": 500, "by_buffer": {
    200: {"lr": 0.01, "strength": 1.0, "memory_per_task": 40},
    500: {"lr": 0.03, "strength": 0.5, "memory_per_task": 100}}},
  ("seq-mnist", "lwf"): {"lr": 0.03, "alpha": 1.0, "temperature": 2.0},
  ("seq-mnist", "online_ewc"): {"lr": 0.03, "strength": 2 * 90.0, "decay": 1.0},
  ("seq-mnist", "si"): {"lr": 0.1, "strength": 2 * 1.0, "xi": 0.9},
}  # fmt: skip

# DER's P-MNIST and R-MNIST (mammoth utils/best_args.py, 'perm-mnist' / 'rot-mnist'), per
# buffer size; memory batch 128 throughout. A-GEM and GEM: a ring per task of buffer / 20.
_DER_DOMAIN = {
  ("der-pmnist", "er"): {"buffer": 500, "lr": 0.2, "memory_batch": 128},
  ("der-rmnist", "er"): {"buffer": 500, "lr": 0.2, "memory_batch": 128},
  ("der-pmnist", "der"): {"buffer": 500, "lr": 0.2, "memory_batch": 128, "alpha": 1.0},
  ("der-rmnist", "der"): {"buffer": 500, "lr": 0.2, "memory_batch": 128, "by_buffer": {
    200: {"alpha": 1.0}, 500: {"alpha": 0.5}}},
  ("der-pmnist", "derpp"): {"buffer": 500, "memory_batch": 128, "alpha": 1.0, "by_buffer": {
    200: {"lr": 0.1, "beta": 1.0}, 500: {"lr": 0.2, "beta": 0.5}}},
  ("der-rmnist", "derpp"): {"buffer": 500, "memory_batch": 128, "by_buffer": {
    200: {"lr": 0.1, "alpha": 1.0, "beta": 0.5}, 500: {"lr": 0.2, "alpha": 0.5, "beta": 1.0}}},
  ("der-pmnist", "agem"): {"buffer": 500, "lr": 0.1, "memory_batch": 128, "by_buffer": {
    200: {"memory_per_task": 10}, 500: {"memory_per_task": 25}}},
  ("der-rmnist", "agem"): {"buffer": 500, "memory_batch": 128, "by_buffer": {
    200: {"lr": 0.1, "memory_per_task": 10}, 500: {"lr": 0.3, "memory_per_task": 25}}},
  ("der-pmnist", "gem"): {"buffer": 500, "lr": 0.1, "strength": 0.5, "by_buffer": {
    200: {"memory_per_task": 10}, 500: {"memory_per_task": 25}}},
  ("der-rmnist", "gem"): {"buffer": 500, "lr": 0.01, "strength": 0.5, "by_buffer": {
    200: {"memory_per_task": 10}, 500: {"memory_per_task": 25}}},
}  # fmt: skip

# The learning rate and hyper-parameters a paper used for a method on a protocol,
# keyed by (preset, method); a key "preset/scenario" (e.g. "split-mnist/domain")
# adds to the preset's row for one scenario of a split stream. --lr / --hp win.
SETTINGS: dict[tuple[str, str], dict] = {
  # A-GEM's replicate_results_iclr19.sh (PMNIST): A-GEM lr 0.1; GEM lr 0.03, 250 per task;
  # EWC lr 0.03, lambda 10; MAS lr 0.1, lambda 0.1 (strength = 2 lambda_p); PI (SI) lr 0.1,
  # c 0.1 (strength = 2c), xi 0.1 (xi 1e-3 gave a non-finite loss on task 2 at lr 0.1)
  **_rows(_AGEM_PMNIST, ["agem"], {"lr": 0.1}),
  **_rows(_AGEM_PMNIST, ["gem"], {"lr": 0.03, "memory_per_task": 250}),
  **_rows(_AGEM_PMNIST, ["ewc", "online_ewc"], {"lr": 0.03, "strength": 10.0}),
  **_rows(_AGEM_PMNIST, ["mas"], {"lr": 0.1, "strength": 2 * 0.1}),
  **_rows(
    _AGEM_PMNIST, ["si"], {"lr": 0.1, "strength": 2 * 0.1, "xi": 0.1, "include_penalty": False}
  ),
  # RWalk: lr 0.1, lambda 1 (strength = 2 lambda), K 10, alpha 0.9 (replicate_results_iclr19.sh)
  **_rows(_AGEM_PMNIST, ["rwalk", "rwalk_official"], {"lr": 0.1, "strength": 2 * 1.0}),
  # The A-GEM code's own EWC and MAS (methods/agem_code.py): lambda 10 at lr 0.03, lambda 0.1
  # at lr 0.1; their penalty lambda * sum(Omega (theta - theta*)^2) has no 1/2: strength 2 lambda
  **_rows(_AGEM_PMNIST, ["ewc_agem_code"], {"lr": 0.03, "strength": 2 * 10.0}),
  **_rows(_AGEM_PMNIST, ["mas_agem_code"], {"lr": 0.1, "strength": 2 * 0.1}),
  # GEM (Lopez-Paz & Ranzato 2017): 256 memories per task
  **_rows(_GEM_MNIST, ["agem"], {"memory_per_task": 256}),
  # van de Ven, Tuytelaars & Tolias (param_values.py), split MNIST: EWC lambda 1e5 / 1e10 /
  # 1e9 and SI c 10 / 5e4 / 5e3 (strength = 2c) for task / domain / class-IL, xi 0.1; their
  # Fisher takes the expectation over all labels (fisher="exact") of every example
  **_rows(["split-mnist"], ["ewc", "online_ewc"], {"fisher_n": None}),
  **{
    (f"{p}/{sc}", m): {"strength": s}
    for p in _SPLIT
    for sc, ewc, si in [("task", 1e5, 10.0), ("domain", 1e10, 5e4), ("class", 1e9, 5e3)]
    for m, s in [("ewc", ewc), ("online_ewc", ewc), ("si", 2 * si)]
  },
  # van de Ven & Tolias 2019 as its code ran it (commit f0b1461, param_values.py, split MNIST,
  # task / domain / class): EWC lambda 1e7 / 1e6 / 1e8; online EWC lambda 1e8 / 1e8 / 1e9 with
  # gamma 0.8 / 0.7 / 0.8 (its loss is (lambda / 2) gamma F~ (theta - theta*)^2: strength
  # lambda gamma); SI c 50 / 500 / 0.5 (strength 2c); the Fisher of the model's predicted
  # label (on every example there; on 1000 per task here, as the split-mnist rows)
  **_rows(["split-mnist-2019"], ["ewc", "online_ewc"], {"fisher": "predicted", "fisher_n": 1000}),
  **{
    (f"split-mnist-2019/{sc}", m): s
    for sc, ewc, oewc, gamma, si in [
      ("task", 1e7, 1e8, 0.8, 50.0),
      ("domain", 1e6, 1e8, 0.7, 500.0),
      ("class", 1e8, 1e9, 0.8, 0.5),
    ]
    for m, s in [
      ("ewc", {"strength": ewc}),
      ("online_ewc", {"strength": oewc * gamma, "decay": gamma}),
      ("si", {"strength": 2 * si}),
    ]
  },  # fmt: skip
  # NCL (Kao et al. 2021): data_size N = the examples per task
  **_rows(["split-mnist"], ["ncl", "ncl_kfac"], {"data_size": 12000.0, "fisher_n": None}),
  **_rows(["pmnist-agem"], ["ncl", "ncl_kfac"], {"data_size": 55000.0}),  # train[5000:]
  # 1000 where a task has 1000 (60000 there froze the net: 15.5 %)
  **_rows(["pmnist-agem-1k", "pmnist-gem"], ["ncl", "ncl_kfac"], {"data_size": 1000.0}),
  **_rows(["pmnist-gpm"], ["ncl", "ncl_kfac"], {"data_size": 54000.0}),
  # OGD (Farajtabar et al. 2020): 200 per task; every task but the last adds its 200;
  # split digits: 50 per task (200 cost ~40 s of Gram-Schmidt per seed on 2 cores)
  ("split-digits", "ogd"): {"samples": 50, "max_directions": 200},
  ("pmnist-agem-1k", "ogd"): {"samples": 200, "max_directions": 16 * 200},
  **_rows(_GEM_MNIST, ["ogd"], {"samples": 200, "max_directions": 19 * 200}),
  ("pmnist-gpm", "ogd"): {"samples": 200, "max_directions": 9 * 200},
  # GPM (Saha et al. 2021), single-head permuted streams: its PMNIST thresholds, head projected
  **_rows(
    ["pmnist-gpm", *_AGEM_PMNIST, *_GEM_MNIST],
    ["gpm", "gpm_official", "sgp", "trgp"],
    {"thresholds": [0.95, 0.99, 0.99], "project_head": True},
  ),
  # Adam-NSCL on the GPM protocol (no paper setting for MNIST): the head projected as GPM's
  ("pmnist-gpm", "nscl"): {"project_head": True},
  **_SEQ_MNIST,
  **_DER_DOMAIN,
  # van de Ven & Tolias 2019 (split MNIST, Adam): LwF with T = 2, the distillation
  # weighted 1 - 1/t against 1/t for the new loss, times T^2 (same direction under Adam
  # as alpha = T^2 times the number of old tasks)
  ("split-mnist", "lwf"): {"alpha": 4.0, "scale_by_tasks": True},
  # the demo (split digits, 1440 training examples per task): a 200-item buffer
  **_rows(["split-digits"], ["er", "der", "derpp"], {"buffer": 200, "memory_batch": 32}),
  **_rows(["split-digits"], ["agem", "gem"], {"memory_per_task": 40}),
  ("split-digits", "agem"): {"memory_per_task": 40, "memory_batch": 64},
  # HAT's pmnist net (joansj/hat networks/mlp_hat.py L8): input dropout 0.2, hidden 0.5;
  # c (lamb) 0.75 and s_max 400 are the entry's defaults (approaches/hat.py L25-26)
  ("hat-pmnist", "hat"): {"dropout_in": 0.2, "dropout": 0.5},
  # WSN's PMNIST script (scripts/wsn/wsn_pmnist.sh): --sparsity 0.5, the kept fraction c
  ("wsn-pmnist", "wsn"): {"keep": 0.5},
}


def settings(preset: str, scenario: str, method: str, buffer: int | None = None) -> dict:
  """``SETTINGS`` of ``method`` on ``preset``, then on ``preset/scenario`` (a copy).

  A row's ``by_buffer`` entry ``{size: settings}`` adds the settings of the memory
  size ``buffer`` (``--hp buffer=N``; default: the row's ``buffer``).
  """
  spec = dict(SETTINGS.get((preset, method), {}))
  spec.update(SETTINGS.get((f"{preset}/{scenario}", method), {}))
  by_buffer = spec.pop("by_buffer", {})
  size = int(buffer if buffer is not None else spec.get("buffer", 0))
  if by_buffer and size not in by_buffer:
    raise ValueError(f"{method} on {preset}: the paper's settings are for buffers "
                     f"{sorted(by_buffer)}; got {size} (pass --lr / --hp to choose).")  # fmt: skip
  spec.update(by_buffer.get(size, {}))
  return spec
