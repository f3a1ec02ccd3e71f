"""A griffe extension for the docs build: Sphinx roles in docstrings become cross-references.

lorapool's docstrings link with Sphinx roles (``:class:`~lorapool.errors.LoadError```),
which Markdown would show as ``:class:`` and a code span. Each role becomes an *optional*
mkdocs-autorefs reference: a link where the target is rendered somewhere in the site, plain
code where it is not (a private module), so ``mkdocs build --strict`` never fails on one.
A name without dots is looked up in the scope of the docstring's object.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const|type):`(?P<target>[^`]+)`"
)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx cross-reference roles in every docstring (see the module's docstring)."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is None or ":`" not in obj.docstring.value:
            return
        obj.docstring.value = _ROLE.sub(lambda m: _autoref(obj, m["target"]), obj.docstring.value)


def _autoref(obj: griffe.Object, target: str) -> str:
    text = target.strip()
    if "<" in text and text.endswith(">"):  # :class:`title <path>`
        title, _, path = text[:-1].partition("<")
        title, path = title.strip(), path.strip()
    else:
        short = text.startswith("~")
        path = text.lstrip("~.")
        title = path.rsplit(".", 1)[-1] if short else path
    identifier = path
    if "." not in path or not path.startswith("lorapool"):
        head, _, rest = path.partition(".")
        try:
            resolved = obj.resolve(head)
        except (griffe.NameResolutionError, AttributeError, ValueError):
            resolved = None
        if resolved:
            identifier = f"{resolved}.{rest}" if rest else resolved
    code = f"<code>{html.escape(title)}</code>"
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'
