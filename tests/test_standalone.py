"""The repository stands alone: no file refers to design notes or data kept outside it.

Design facts live in docs/. The forbidden strings are assembled from pieces so that this file
does not match itself.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".jax_cache"}
SKIP_DIRS |= {"build", "dist"}
# the outside design-notes file, cited with or without ".md" or a section, and the folder beside
# the checkout
# (also as a path join: a slash, then the folder name in quotes)
FORBIDDEN = (
    re.compile(rb"\bDESI" + rb"GN\b"),
    re.compile(re.escape(b".." + b"/shared")),
    re.compile(rb"/\s*[\"']sha" + rb"red[\"']"),
)


def text_files(root: Path):
    """Every text file under ``root`` outside SKIP_DIRS (binary = a NUL byte in its first 8 KiB)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if b"\0" not in data[:8192]:
                    yield path, data


def line_of(data: bytes, m: re.Match) -> int:
    return data[: m.start()].count(b"\n") + 1


def test_no_file_refers_to_outside_design_notes_or_data():
    hits = [
        f"{path.relative_to(ROOT)}:{line_of(data, m)}: {m.group().decode()}"
        for path, data in text_files(ROOT)
        for pattern in FORBIDDEN
        for m in pattern.finditer(data)
    ]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_the_check_sees_the_docs_and_sources():
    seen = {p.relative_to(ROOT).as_posix() for p, _ in text_files(ROOT)}
    assert {"README.md", "docs/architecture.md", "cryoden/models.py", "tests/conftest.py"} <= seen


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_between_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.is_file() or (anchor and anchor not in anchors(dest.read_text())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
