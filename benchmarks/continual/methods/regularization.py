"""Importance-weighted penalties as gradients (EWC, online EWC, MAS, SI, RWalk).

EWC and MAS estimate importance with `cl_optax.importance` on (at most `fisher_n` of)
the task's training examples, through the task's own head; SI accumulates its path
integral inside `update` and consolidates without a signal.
"""

import jax.numpy as jnp
import optax

import cl_optax
from benchmarks.continual.registry import Method, TaskEnd, register

# MAS and SI default strength 0.2 = 2 * 0.1: the A-GEM code's permuted-MNIST MAS lambda (0.1,
# replicate_results_iclr19.sh) and Zenke et al.'s permuted-MNIST c (0.1), with this library's
# strength = 2 lambda (= 2c) convention; taken from those sources, not tuned on test results.
# At 2.0 plain SGD at lr 0.1 diverges on task 2 of pmnist-5x10k (lr * strength * max Omega >= 2).
_PENALTY_STRENGTH = 2 * 0.1


def fisher(e: TaskEnd):
  """``importance.fisher_diag`` (kind ``hp["fisher"]``) through the task's head.

  ``"predicted"`` (van de Ven's 2019 code): the empirical Fisher at the model's most
  likely label of each example instead of its data label.
  """
  fn, kind = e.heads.task[e.task], e.hp["fisher"]
  batches = e.first_batches(e.hp.get("fisher_n"))
  if kind == "predicted":
    xs, _ = batches
    ys = jnp.stack([jnp.argmax(fn(e.params, x), -1) for x in xs]).astype(jnp.int32)
    batches, kind = cl_optax.importance.Batches(xs, ys), "empirical"
  return cl_optax.importance.fisher_diag(fn, e.params, batches, fisher=kind, key=e.key)


def _consolidate_fisher(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params, importance=fisher(e)), e.aux


def _consolidate_mas(e: TaskEnd):
  batches = e.first_batches(e.hp.get("fisher_n"))
  imp = cl_optax.importance.mas_sensitivity(e.heads.task[e.task], e.params, batches)
  return cl_optax.consolidate(e.opt_state, e.params, importance=imp), e.aux


def _consolidate_plain(e: TaskEnd):
  return cl_optax.consolidate(e.opt_state, e.params), e.aux


register(
  Method(
    "ewc",
    lambda h: optax.chain(cl_optax.ewc(h.hp["strength"]), h.base()),
    "EWC (Kirkpatrick et al. 2017): importance.fisher_diag per task, one penalty per task",
    end_task=_consolidate_fisher,
    defaults={"strength": 10.0, "fisher": "exact", "fisher_n": 1000},
  )
)
register(
  Method(
    "online_ewc",
    lambda h: optax.chain(cl_optax.online_ewc(h.hp["strength"], decay=h.hp["decay"]), h.base()),
    "online EWC (Schwarz et al. 2018): running Fisher, latest anchor",
    end_task=_consolidate_fisher,
    defaults={"strength": 10.0, "decay": 1.0, "fisher": "exact", "fisher_n": 1000},
  )
)
register(
  Method(
    "mas",
    lambda h: optax.chain(cl_optax.mas(h.hp["strength"]), h.base()),
    "MAS (Aljundi et al. 2018): importance.mas_sensitivity (output-norm gradients) per task",
    end_task=_consolidate_mas,
    defaults={"strength": _PENALTY_STRENGTH, "fisher_n": 1000},
  )
)
# strength = 2c (the papers' penalty has no 1/2); xi: SI's denominator term, omega / (delta^2 + xi)
register(
  Method(
    "si",
    lambda h: optax.chain(
      cl_optax.si(h.hp["strength"], xi=h.hp["xi"], include_penalty=h.hp["include_penalty"]),
      h.base(),
    ),
    "SI (Zenke et al. 2017): path integral inside update, consolidate needs no signal",
    end_task=_consolidate_plain,
    defaults={"strength": _PENALTY_STRENGTH, "xi": 0.1, "include_penalty": True},
  )
)
# RWalk: strength = 2 lambda (the code's penalty has no 1/2); its window K and EMA weight alpha
# (fisher_update_after 10, fisher_ema_decay 0.9 in the A-GEM code's permuted-MNIST run)
for _name, _official, _doc in [
  ("rwalk", False, "RWalk (Chaudhry et al. 2018), the paper's form: online Fisher + KL path score"),
  ("rwalk_official", True, "RWalk as the A-GEM code runs it (T kept within a task; 1.5/0.5 merge)"),
]:
  register(
    Method(
      _name,
      lambda h, official=_official: optax.chain(
        cl_optax.rwalk(
          h.hp["strength"],
          alpha=h.hp["alpha"],
          every=int(h.hp["fisher_every"]),
          xi=h.hp["xi"],
          official=official,
        ),
        h.base(),
      ),
      _doc,
      end_task=_consolidate_plain,
      defaults={"strength": 2 * 1.0, "alpha": 0.9, "fisher_every": 10, "xi": 1e-3},
    )
  )
