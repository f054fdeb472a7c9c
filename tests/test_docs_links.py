"""The README is a front page and every link of it and of docs/ resolves: relative files exist and #anchors name a
heading of their page (GitHub's anchors), so a section that moves or is renamed cannot leave a dead link behind."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from bnbackdoor.report.readme_blocks import BLOCKS, PAGES

MAX_README_LINES = 300  # issue 44: the README is a front page; the long generated sections live in docs/

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """The text without code: a bracket in a code block or span is no link."""
    return _CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    return _LINK.findall(_prose(text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks too) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for h in _HEADING.findall(_FENCE.sub("", text)):
        a = anchor(h)
        n = seen.get(a, 0)
        out.add(a if n == 0 else f"{a}-{n}")
        seen[a] = n + 1
    return out


def broken(page: Path) -> list[str]:
    """The links of ``page`` that do not resolve, each with why."""
    out = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: - nothing offline to check
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text(encoding="utf-8")):
            out.append(f"{target}: no heading #{frag} in {path or page.name}")
    return out


def test_the_checker_finds_dead_files_and_anchors_and_ignores_code(tmp_path):
    (tmp_path / "b.md").write_text("# Two defenses that the paper's name covers\n## What `attack.py` writes\n## x\n"
                                   "## x\n```\n# not a heading\n```\n")
    a = tmp_path / "a.md"
    a.write_text("[ok](b.md#two-defenses-that-the-papers-name-covers) [ok](b.md#what-attackpy-writes) "
                 "[ok](b.md#x-1) [web](https://example.org/x) [self](#top)\n# Top\n"
                 "[gone](c.md) [bad](b.md#not-a-heading) [bad](b.md#x-2) `[code](c.md)`\n```\n[code](c.md)\n```\n")
    assert [b.split(":")[0] for b in broken(a)] == ["c.md", "b.md#not-a-heading", "b.md#x-2"]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    assert broken(page) == []


def test_readme_is_a_front_page_that_links_every_docs_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(text) if not t.startswith("#")}
    assert {p.resolve() for p in (ROOT / "docs").rglob("*.md")} <= linked
    assert text.count("<!-- generated:") == 1, "the README holds one generated table: the findings"
    assert "<!-- generated:findings -->" in text


def test_every_generated_block_lives_on_exactly_one_page():
    """No table was lost when the sections moved, none is shown twice, and every page make_results fills exists."""
    where: dict[str, list[str]] = {}
    for page in PAGES:
        path = ROOT / page
        assert path.is_file(), f"{page} is missing (make_results.py fills it)"
        for name in re.findall(r"^<!-- generated:([\w-]+) -->$", path.read_text(encoding="utf-8"), re.M):
            where.setdefault(name, []).append(page)
    assert sorted(where) == sorted(BLOCKS)
    assert {n: p for n, p in where.items() if len(p) != 1} == {}
