"""Progress of the runner: tqdm bars on a terminal, one line per task elsewhere."""

from __future__ import annotations

import sys
import time


def progress_bar(desc: str, total: int):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False, unit="step", file=sys.stderr, mininterval=0.2)


def on_terminal() -> bool:
  return sys.stderr.isatty()


class Ticks:
  """Progress of the task being trained: a tqdm bar that the scan's tick callback
  updates on a terminal; elsewhere (a pipe, a CI log) one line per task when it ends."""

  def __init__(self):
    self.bar, self.line, self.t0 = None, None, 0.0

  def __call__(self, n):
    if self.bar is not None:
      self.bar.update(int(n))

  def open(self, enabled: bool, desc: str, total: int):
    self.bar = progress_bar(desc, total) if enabled and on_terminal() else None
    self.line = desc if enabled and self.bar is None else None
    self.t0 = time.perf_counter()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    if self.line is not None:
      print(f"{self.line}: {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
    self.bar = self.line = None
