"""The debug switch: warnings about signals, masks and extra args that do nothing.

Off by default. When on, :func:`cl_optax.consolidate` warns about signals no
state reads and about continual states whose mask selected no parameter, and
the ``update`` of every cl_optax transform warns about extra arguments that no
cl_optax transform reads. The checks look at names and tree structure only,
at trace time (so they also run inside ``jit``, once per trace); when the
switch is off they cost one boolean test.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

_ENABLED = [False]


def set_debug(enabled: bool = True) -> bool:
  """Turns cl_optax's debug warnings on or off; returns the previous setting.

  With debug on, :func:`cl_optax.consolidate` warns about signals that no
  state in the tree reads and about continual states whose ``optax.masked`` /
  ``optax.partition`` selection holds no parameter, and cl_optax transforms'
  ``update`` warns about extra arguments no cl_optax transform reads (see
  :func:`cl_optax.unread_extra_args` for the check on one chain).

  Example:
    >>> import cl_optax
    >>> previous = cl_optax.set_debug(True)
    >>> _ = cl_optax.set_debug(previous)
  """
  previous = _ENABLED[0]
  _ENABLED[0] = bool(enabled)
  return previous


@contextlib.contextmanager
def debug(enabled: bool = True) -> Iterator[None]:
  """Context manager form of :func:`set_debug`: debug warnings inside the block.

  Example:
    >>> import cl_optax
    >>> with cl_optax.debug():
    ...   pass  # consolidate / update calls here warn about unread signals
  """
  previous = set_debug(enabled)
  try:
    yield
  finally:
    set_debug(previous)


def enabled() -> bool:
  """Whether the debug switch is on."""
  return _ENABLED[0]


def warn(message: str) -> None:
  """A ``UserWarning`` pointing at the caller of the cl_optax function."""
  warnings.warn(message, UserWarning, stacklevel=4)


def known_extra_args() -> frozenset[str]:
  """Every extra argument some cl_optax transform's ``update`` reads."""
  import cl_optax  # late: the transforms import this module

  names: set[str] = set()
  for obj in vars(cl_optax).values():
    if isinstance(obj, type):
      names.update(getattr(obj, "EXTRA_ARGS", ()))
  return frozenset(names)


def check_extra_args(transform: str, extra_args: Iterable[str]) -> None:
  """Under debug, warns about extra args that no cl_optax transform reads.

  Called by each cl_optax ``update`` with the names of the extra args it got.
  It cannot see which extra args other libraries' transforms read (optax's
  ``value=`` of ``polyak_sgd``, ...): those are reported too.
  """
  if not _ENABLED[0]:
    return
  unknown = sorted(set(extra_args) - known_extra_args())
  if unknown:
    warn(
      f"cl_optax debug: extra argument(s) {unknown} passed to update are read by no "
      f"cl_optax transform ({transform} got them; cl_optax transforms read "
      f"{sorted(known_extra_args())}). A transform of another library may read them; "
      "if not, check the spelling."
    )
