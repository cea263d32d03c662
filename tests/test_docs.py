"""The documentation's code runs, and the site builds strictly.

Every fenced ``python`` block of every ``docs/*.md`` page and of ``README.md`` is
executed; the blocks of one page run in order in one namespace (later blocks use what
earlier ones defined, as a reader would). A block right after an HTML comment
``<!-- skip-test -->`` is not run (GPU-only or multi-process snippets).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchcurv

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SKIP_MARK = "<!-- skip-test -->"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, source, skipped)`` for each fenced python block, in page order."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        skipped = before.endswith(SKIP_MARK)
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(1), skipped))
    return blocks


def test_block_extraction_and_skip_marker():
    page = ("text\n```python\na = 1\n```\n<!-- skip-test -->\n```python\nraise SystemExit\n"
            "```\n```bash\nls\n```\n```python\nb = a + 1\n```\n")
    blocks = python_blocks(page)
    assert [(src, skipped) for _, src, skipped in blocks] == [
        ("a = 1\n", False), ("raise SystemExit\n", True), ("b = a + 1\n", False)]
    assert [line for line, _, _ in blocks] == [3, 7, 13]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_code_runs(page, monkeypatch):
    blocks = [b for b in python_blocks(page.read_text()) if not b[2]]
    if not blocks:
        pytest.skip("no python blocks to run")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    # The pages' models are tiny: threads only add synchronisation (and stall badly on a
    # busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, source, _ in blocks:
            # Padding keeps tracebacks pointing at the page's own line numbers.
            code = compile("\n" * (line - 1) + source, str(page), "exec")
            try:
                exec(code, namespace)
            except torchcurv.MissingExtraError as e:
                pytest.skip(f"{page.name} line {line} needs an optional package: {e}")
    finally:
        torch.set_num_threads(threads)


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    nav_pages = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(),
                           re.MULTILINE)
    missing = [p for p in nav_pages if not (ROOT / "docs" / p).exists()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_api_reference_lists_every_public_name_once_operators_first_errors_last():
    page = (ROOT / "docs" / "api.md").read_text()
    entries = re.findall(r"^::: torchcurv\.(\w+)$", page, re.MULTILINE)
    public = set(torchcurv.__all__)
    listed = [e for e in entries if e in public]
    assert sorted(listed) == sorted(public), "add new public names to a section of api.md"
    headings = re.findall(r"^## (.+)$", page, re.MULTILINE)
    assert headings[:6] == ["Operators", "Objectives", "Adapters", "Algorithms", "Results",
                            "Errors"]
    assert listed[0] == "HessianOperator"
    assert all(isinstance(getattr(torchcurv, n), type) and issubclass(getattr(torchcurv, n),
                                                                      Exception)
               for n in listed[-7:])
