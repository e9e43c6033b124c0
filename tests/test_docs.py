"""docs/design.md has every section the code cites, and the docs' relative links point at files that exist."""
import os
import re
from pathlib import Path

SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "output", "data", "checkpoints", "node_modules", "build"}


def _files(repo_root, suffixes):
    """(relative path, text) of the project's own files with these suffixes; environments and outputs pruned."""
    for top, dirs, names in os.walk(repo_root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
        for name in sorted(names):
            path = Path(top) / name
            if path.suffix in suffixes:
                yield path.relative_to(repo_root), path.read_text(errors="replace")


def _design_headings(repo_root):
    text = (repo_root / "docs" / "design.md").read_text()
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    numbers = {m.group(1) for h in headings for m in [re.match(r"§(\d+(?:\.\d+)*)\b", h)] if m}
    return headings, numbers


def test_every_cited_design_section_exists(repo_root):
    headings, numbers = _design_headings(repo_root)
    assert {"1", "2.3", "7.3", "10", "11", "12"} <= numbers
    cited = {}
    for rel, text in _files(repo_root, {".py", ".md", ".sh", ".toml", ".yaml", ".yml"}):
        for m in re.finditer(r"design\.md[ ,]*((?:§\d+(?:\.\d+)*(?:\s*(?:-|–|,|and)\s*)?)+)", text):
            for num in re.findall(r"§(\d+(?:\.\d+)*)", m.group(1)):
                cited.setdefault(num, []).append(str(rel))
        for m in re.finditer(r'design\.md, "([^"]+)"', text):   # cited by heading name
            assert any(m.group(1) in h for h in headings), f"{rel} cites design.md \"{m.group(1)}\": no such heading"
    assert cited, "no design.md citations found"
    missing = {n: files for n, files in cited.items() if n not in numbers}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"


def test_relative_links_resolve(repo_root):
    broken = []
    for rel, text in _files(repo_root, {".md"}):
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            target = target.split("#", 1)[0]
            if target and not re.match(r"[a-z]+:", target) and not (repo_root / rel.parent / target).exists():
                broken.append(f"{rel}: {target}")
    assert not broken, broken
