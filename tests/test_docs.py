"""Every reference to a document resolves inside the repository.

- Every relative link of the Markdown files (README.md, docs/, benchmarks/, examples/) names a file or
  directory that exists, and its ``#anchor`` (or a bare ``#anchor`` in the same file) a heading of the
  target, slugged as GitHub does.
- Every ``docs/NAME.md`` or ``docs/NAME.md#anchor`` written in the code, configs, scripts and Markdown
  (flowrl/, configs/, README.md, docs/, benchmarks/, examples/) names a document and a heading of it.
- Nothing cites the algorithm document that never existed ("spec section N", ``docs/flowrl-spec.md``):
  the algorithm is docs/algorithm.md, the papers docs/papers.md.
- docs/algorithm.md keeps its numbered sections (code cites them by anchor), and docs/papers.md lists
  every arXiv id the code and the documents cite.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
MARKDOWN = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").rglob("*.md")]
    + [p for p in (REPO / "examples").rglob("*.md")]
)
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"}
CITING = sorted(
    p
    for p in [
        REPO / "README.md",
        *(p for d in ("flowrl", "configs", "docs", "benchmarks", "examples") for p in (REPO / d).rglob("*")),
    ]
    if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
)
# Files where the old spec's name may still appear: this test (its patterns) and the trainer, which
# another change rewrites (its references are fixed there).
SPEC_ALLOWED = {Path("tests/test_docs.py"), Path("flowrl/trainer.py")}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).+?\1")
DOC_PATH = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)(#[\w-]+)?")
OLD_SPEC = re.compile(r"spec sections?\b|flowrl-spec|spec §|the spec's", re.IGNORECASE)
# arXiv ids since 2007: YYMM.NNNN(N), year 07-29, month 01-12 (no version numbers or timings match).
ARXIV_ID = re.compile(r"(?<![\d.])(?:0[7-9]|1\d|2\d)(?:0[1-9]|1[0-2])\.\d{4,5}(?!\d)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, with their numbers."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def _check_target(target: Path, anchor: str | None, where: str) -> list[str]:
    if not target.exists():
        return [
            f"{where}: {target.relative_to(REPO) if target.is_relative_to(REPO) else target} does not exist"
        ]
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return [f"{where}: no heading of {target.relative_to(REPO)} has the anchor #{anchor}"]
    return []


def link_problems(path: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file."""
    problems = []
    for number, line in _prose_lines(path):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            url = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.IGNORECASE):  # http:, https:, mailto:
                continue
            file_part, _, anchor = url.partition("#")
            target = (path.parent / file_part).resolve() if file_part else path
            problems += _check_target(target, anchor or None, f"{path.relative_to(REPO)}:{number} ({url})")
    return problems


def doc_path_problems(path: Path) -> list[str]:
    """What is wrong with the ``docs/NAME.md[#anchor]`` references of one file (paths from the repo root)."""
    problems = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        for match in DOC_PATH.finditer(line):
            target = REPO / "docs" / match.group(1)
            anchor = match.group(2)[1:] if match.group(2) else None
            problems += _check_target(target, anchor, f"{path.relative_to(REPO)}:{number} ({match.group(0)})")
    return problems


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_links_resolve(path: Path) -> None:
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


def test_cited_documents_and_anchors_exist() -> None:
    problems = [problem for path in CITING for problem in doc_path_problems(path)]
    assert not problems, "\n".join(problems)


def test_nothing_cites_the_old_spec() -> None:
    files = [*CITING, *(REPO / "tests").rglob("*.py")]
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        if path.relative_to(REPO) not in SPEC_ALLOWED
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if OLD_SPEC.search(line)
    ]
    assert not found, "cite docs/algorithm.md#<section> (or docs/papers.md) instead:\n" + "\n".join(found)


def test_algorithm_sections_keep_their_numbers() -> None:
    numbered = [
        match.group(1)
        for _, line in _prose_lines(REPO / "docs" / "algorithm.md")
        if (match := re.match(r"^## (\d+)\. ", line))
    ]
    assert numbered == [str(i) for i in range(1, len(numbered) + 1)] and len(numbered) >= 8


def test_every_cited_paper_is_in_the_index() -> None:
    index = (REPO / "docs" / "papers.md").read_text()
    cited: dict[str, str] = {}
    for path in CITING:
        if path.name == "papers.md":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for paper in ARXIV_ID.findall(line):
                cited.setdefault(paper, f"{path.relative_to(REPO)}:{number}")
    assert "2509.15207" in cited  # the extraction finds the FlowRL paper
    missing = {paper: where for paper, where in cited.items() if paper not in index}
    assert not missing, f"add these papers to docs/papers.md: {missing}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("1. Objective", "1-objective"),
        ("Group estimate (`log_z.mode=group`)", "group-estimate-log_zmodegroup"),
        ("GRPO and Dr. GRPO", "grpo-and-dr-grpo"),
        ("log Z: a head or the group estimate", "log-z-a-head-or-the-group-estimate"),
        ("Configuration (`FlowRLConfig`)", "configuration-flowrlconfig"),
    ],
)
def test_slug_is_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_the_checks_catch_broken_references() -> None:
    assert link_problems(REPO / "README.md") == []
    broken = REPO / "docs" / "algorithm.md"
    assert _check_target(broken, "9-no-such-section", "x") and not _check_target(broken, "3-switches", "x")
    assert _check_target(REPO / "docs" / "flowrl-spec.md", None, "x")
    assert OLD_SPEC.search("defaults trace to the paper (spec section 4)")
    assert DOC_PATH.search("see docs/algorithm.md#4-training-settings.").groups() == (
        "algorithm.md",
        "#4-training-settings",
    )
