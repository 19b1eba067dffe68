"""Docs live in the repository: every docs/ page the code or the README names exists, the docs
index lists every page, and nothing user-facing points at text outside the repository or at the
project's development history."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_FACING = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
               *sorted((REPO / "torchxla_rlhf").rglob("*.py")),
               *sorted((REPO / "configs").rglob("*.yaml"))]


def test_named_docs_pages_exist():
    named = {}
    for path in USER_FACING:
        for page in re.findall(r"\bdocs/([\w-]+\.md)", path.read_text()):
            named.setdefault(page, str(path.relative_to(REPO)))
    assert {"dpo.md", "reward.md", "ppo.md", "deviations.md"} <= set(named)
    missing = {page: where for page, where in named.items() if not (REPO / "docs" / page).is_file()}
    assert missing == {}


def test_docs_index_links_every_page():
    index = (REPO / "docs" / "README.md").read_text()
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages and {p for p in pages if f"]({p})" not in index} == set()


def test_no_references_outside_the_repository_or_to_history():
    pattern = re.compile(r"spec section|spec §|reference-semantics|\bissue\s*#?\d+|traps met",
                         re.IGNORECASE)
    sources = [*USER_FACING, *sorted((REPO / "bench").glob("*.py")),
               *sorted(p for p in (REPO / "tests").glob("*.py") if p.name != "test_docs.py")]
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
            for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
