"""The documentation holds together: README.md stays short enough to read in a few minutes (the rest lives in
docs/), and every relative link in README.md and docs/*.md points at a file of the checkout, and at a heading
of it when the link names one (``FILE.md#anchor``, GitHub's anchors). External links (http:, mailto:) are not
followed: CI has no network."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import REPO

pytestmark = pytest.mark.stack_independent  # text and links: the same on any torch (see conftest.py)

README_MAX_LINES = 250
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\[\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # link text may wrap lines


def links(text: str) -> list[str]:
    """The targets of the markdown links and images in ``text``, outside code blocks and inline code."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(text)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    problems = []
    for target in links(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not path.exists():
            problems.append(f"{target}: no such file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {path.name}")
    return problems


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    problems = broken_links(doc)
    assert not problems, f"broken links in {doc.relative_to(REPO)}:\n" + "\n".join(problems)


def test_the_link_reader_finds_links_and_skips_code(tmp_path):
    text = ("See [a](docs/A.md), ![img](x.png \"title\") and [b, wrapped\nover lines](B.md#some-heading).\n"
            "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[web](https://example.com)\n")
    assert links(text) == ["docs/A.md", "x.png", "B.md#some-heading", "https://example.com"]
    assert anchors("# The GPU check\n## Which switch when\n### `fused` ops (2026)\n## Which switch when\n") == {
        "the-gpu-check", "which-switch-when", "fused-ops-2026", "which-switch-when-1"}
    (tmp_path / "B.md").write_text("# Some heading\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](B.md#some-heading) [gone](C.md) [bad anchor](B.md#other) [self](#nowhere)\n")
    assert [p.split(":")[0] for p in broken_links(doc)] == ["C.md", "B.md#other", "#nowhere"]
