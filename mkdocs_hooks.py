"""mkdocs hook: render the Sphinx roles in torchcurv's docstrings.

The docstrings use ``:func:`torchcurv.eigsh``` / ``:class:`~torchcurv.X``` (readable in
``help()`` and in editors); mkdocstrings renders them as the literal role name followed by
code. This hook drops the role, shortens ``~`` targets to their last component, as Sphinx
does, and on the API page links names that torchcurv exports to their entry.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)</code>")


def _exported() -> set[str]:
    # Read __all__ without importing torchcurv (and torch) into the docs build.
    tree = ast.parse((Path(__file__).parent / "torchcurv" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


_EXPORTED = _exported()


def on_page_content(html: str, page, config, files) -> str:
    on_api_page = page.file.src_uri == "api.md"

    def render(match: re.Match) -> str:
        short, target = match.group(1), match.group(2)
        name = target.rsplit(".", 1)[-1]
        text = f"<code>{name if short else target}</code>"
        if on_api_page and name in _EXPORTED:
            return f'<a href="#torchcurv.{name}">{text}</a>'
        return text

    return _ROLE.sub(render, html)
