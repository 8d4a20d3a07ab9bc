"""The documentation's links hold: every relative link in README.md and docs/ names a file that
exists and, with a #fragment, a heading in it; every page is reachable from the README; no page
speaks of issue numbers (no tracker ships with the repository)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# [text](target) outside code; images too. Autolinks and reference-style links are not used here.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The page without its code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text()))]


def resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, fragment = target.partition("#")
    return (page.parent / path).resolve() if path else page, fragment


def test_slug_follows_github() -> None:
    assert slug("Fleet health and canary analysis") == "fleet-health-and-canary-analysis"
    assert slug("Reading `fleet status`") == "reading-fleet-status"
    assert slug("At fleet scale: PostgreSQL, S3 and several replicas") == (
        "at-fleet-scale-postgresql-s3-and-several-replicas"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked offline
            continue
        path, fragment = resolve(page, target)
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and (path.suffix != ".md" or fragment not in anchors(path)):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, broken


def test_every_page_is_reachable_from_the_readme() -> None:
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached or page.suffix != ".md" or not page.exists():
            continue
        reached.add(page)
        for target in links(page):
            if not re.match(r"[a-z]+:", target):
                todo.append(resolve(page, target)[0])
    unreachable = [str(p.relative_to(ROOT)) for p in PAGES if p not in reached]
    assert not unreachable, unreachable


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n[b](b.md#nowhere) [c](c.md) `[d](d.md)`\n")
    (tmp_path / "b.md").write_text("# B\n\n## Somewhere\n")
    assert links(tmp_path / "a.md") == ["b.md#nowhere", "c.md"]
    path, fragment = resolve(tmp_path / "a.md", "b.md#nowhere")
    assert fragment not in anchors(path) and "somewhere" in anchors(path)
    assert not resolve(tmp_path / "a.md", "c.md")[0].exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_cites_issue_numbers(page: Path) -> None:
    found = re.findall(r"(?i)\bissues? #?\d+|(?<![\w/&])#\d+\b", page.read_text())
    assert not found, found
