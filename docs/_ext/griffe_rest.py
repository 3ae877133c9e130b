"""Griffe extension: the reST bits of cl_optax's Google-style docstrings, as Markdown.

The docstrings follow optax's: Google sections (``Args:``, ``Returns:``,
``References:``, ``Example:``) with Sphinx roles and directives inside. The
API pages render Markdown, so before griffe parses a docstring this extension

* names an ``Example:`` section ``Examples:`` (griffe's name for the section
  whose ``>>>`` lines become code blocks; ``Example:`` would be an admonition),
* turns ``.. math::`` blocks into ``$$ ... $$`` and ``:math:`x``` into ``$x$``
  (rendered by ``pymdownx.arithmatex`` and MathJax),
* turns ``:func:`x```, ``:class:`x``` and the other object roles into code.

The docstrings themselves are unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_OBJECT_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")


def _math_blocks(text: str) -> str:
  """``.. math::`` and its indented body -> a ``$$`` block at the directive's indent."""
  lines, out, i = text.split("\n"), [], 0
  while i < len(lines):
    m = re.match(r"^(\s*)\.\. math::\s*(.*)$", lines[i])
    if not m:
      out.append(lines[i])
      i += 1
      continue
    indent, body = m.group(1), [m.group(2)] if m.group(2) else []
    i += 1
    while i < len(lines) and (
      not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
    ):
      body.append(lines[i].strip())
      i += 1
    while body and not body[-1]:
      body.pop()
    body = [b for b in body if b]  # a blank line would end the $$ paragraph
    out += ["", f"{indent}$$"] + [f"{indent}{b}" for b in body] + [f"{indent}$$", ""]
  return "\n".join(out)


def rest_to_markdown(text: str) -> str:
  text = _EXAMPLE.sub(r"\1Examples:", text)
  text = _math_blocks(text)
  text = _MATH_ROLE.sub(r"$\1$", text)
  return _OBJECT_ROLE.sub(r"`\1`", text)


class RestToMarkdown(griffe.Extension):
  """Rewrites each docstring once its object is loaded (see the module docstring)."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = rest_to_markdown(obj.docstring.value)
