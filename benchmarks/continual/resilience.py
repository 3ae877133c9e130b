"""What keeps a long run going: penalty stability, divergence records, task checkpoints.

* :func:`stability_note` checks, after every ``consolidate``, that a quadratic
  penalty (``ewc``, ``online_ewc``, ``mas``, ``si``) can be followed by plain
  SGD: on the penalty :math:`\\tfrac{\\lambda}{2}\\sum_i\\Omega_i(\\theta_i-\\theta^*_i)^2`
  an SGD step multiplies the distance to the anchor by :math:`1 - \\eta\\lambda\\Omega_i`,
  which shrinks only while :math:`\\eta\\,\\lambda\\,\\max\\Omega < 2`; the
  importance sums over tasks, so the check projects it to the last task. The
  note says which hyper-parameter to lower and to what.
* :func:`diverged_record` turns a non-finite loss into a record that says so
  (task, seed, the stability note) so the run goes on with the other methods.
* :class:`TaskCheckpoints` saves a seed's run after every task (orbax for the
  arrays, JSON for the rest) and restores the latest one (``--resume DIR``).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

# The importance field of each quadratic penalty's state (docs/naming.md).
IMPORTANCE_FIELDS = ("ewc_importance", "online_ewc_importance", "mas_importance", "si_importance")
SGD_BASES = ("sgd",)


def max_importance(opt_state) -> float | None:
  """The largest importance of any quadratic penalty in ``opt_state`` (None: none there)."""
  found = []
  for field in IMPORTANCE_FIELDS:
    for _, tree in optax.tree_utils.tree_get_all_with_path(opt_state, field):
      leaves = [x for x in jax.tree.leaves(tree) if np.size(x)]
      found += [float(np.max(np.asarray(x, np.float32))) for x in leaves]
  return max(found) if found else None


def stability_note(
  opt_state, optimizer: str, lr: float, hp: dict, tasks_done: int = 1, n_tasks: int | None = None
) -> str | None:
  """A message when ``lr * strength * max importance`` reaches 2 under plain SGD, else None.

  The importance of ``ewc``, ``mas`` and ``si`` is a sum over tasks (``online_ewc``'s
  too at decay 1), so a run that is stable after ``tasks_done`` tasks can still
  diverge later: with ``n_tasks`` given, the max importance is projected linearly
  to the last task's penalty, ``max Ω × (n_tasks - 1) / tasks_done`` (the sum of
  ``n_tasks - 1`` tasks' importance at the rate seen so far), and the note fires
  and sets its suggested strength (90 % of the bound) by that projection. SI's
  per-task importance ``ω / (Δ² + ξ)`` can grow faster than that (a parameter that
  barely moved has up to ``ω / ξ``): for ``si`` the projection is a lower bound.
  """
  omega = max_importance(opt_state)
  if optimizer not in SGD_BASES or "strength" not in hp or not omega or omega <= 0:
    return None
  strength = float(hp["strength"])
  ahead = max(1.0, (n_tasks - 1) / tasks_done) if n_tasks else 1.0
  projected = omega * ahead
  now, later = lr * strength * omega, lr * strength * projected
  if later < 2:
    return None
  if now >= 2:
    head = f"lr x strength x max importance = {lr:g} x {strength:g} x {omega:.4g} = {now:.4g} "
    head += ">= 2, so SGD on the penalty diverges"
  else:
    head = (
      f"lr x strength x max importance = {lr:g} x {strength:g} x {omega:.4g} = {now:.4g} < 2 "
      f"after {tasks_done} task(s), but the importance sums over tasks: at this rate it reaches "
      f"about {projected:.4g} by the last task's penalty, {later:.4g} >= 2, and SGD diverges"
    )
  bound = 2 / (lr * projected)
  return (
    f"{head}: lower strength below {bound:.4g} (e.g. --hp strength={0.9 * bound:.3g}) "
    f"or lr below {2 / (strength * projected):.4g}"
  )


def diverged_record(record: dict, task: int, seed: int, note: str | None) -> dict:
  """``record`` marked as diverged on ``task``: no metrics, the reason in ``diverged``."""
  reason = f"non-finite training loss on task {task} (seed {seed})"
  if note:
    reason += f"; {note}"
  keep = {k: v for k, v in record.items() if k not in ("acc_matrix", "acc_curve")}
  for k in ("acc", "bwt", "fwt", "forgetting"):
    keep[k] = None
  return {**keep, "diverged": {"task": task, "reason": reason}}


class TaskCheckpoints:
  """``DIR/<method>/seed<k>/task<t>/``: the state after task ``t`` (orbax + ``meta.json``)."""

  def __init__(self, root: pathlib.Path, method: str, seed: int):
    self.dir = pathlib.Path(root).absolute() / method.replace("/", "_") / f"seed{seed}"

  def latest(self) -> int | None:
    done = [int(p.name[4:]) for p in self.dir.glob("task*") if (p / "meta.json").exists()]
    return max(done) if done else None

  def save(self, task: int, arrays: dict, meta: dict) -> None:
    path = self.dir / f"task{task}"
    arrays = dict(arrays, key=jax.random.key_data(arrays["key"]))
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path / "state", arrays, force=True)
    (path / "meta.json").write_text(json.dumps(meta))  # written last: marks it complete

  def restore(self, task: int, target: dict) -> tuple[dict, dict]:
    path = self.dir / f"task{task}"
    target = dict(target, key=jax.random.key_data(target["key"]))
    with ocp.StandardCheckpointer() as ckpt:
      arrays = ckpt.restore(path / "state", target=target)
    arrays["key"] = jax.random.wrap_key_data(arrays["key"])
    return arrays, json.loads((path / "meta.json").read_text())
