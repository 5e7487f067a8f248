"""Rules the documentation keeps, checked: the README is a user's guide of at most 250 lines, reference
docs describe today's code (work-history labels belong in the dated logs of ``docs/experiments/``), no file
cites notes outside the repository, and no Python module grows past 500 lines."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_NOTES = "../shared/" + "notes"  # spelled in two parts so this file does not cite it
HISTORY_LABEL = re.compile(r"\b(stop \d+|session[- ]\d+|issue[- ]\d+|\(issue \d+\))", re.IGNORECASE)


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def test_readme_is_at_most_250_lines() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_reference_docs_carry_no_work_history_labels() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = [f"{p.relative_to(REPO)}:{i}: {m.group(0)}" for p in pages
             for i, line in enumerate(p.read_text().splitlines(), 1) for m in HISTORY_LABEL.finditer(line)]
    assert not found, "move these to docs/experiments/ or drop the label:\n" + "\n".join(found)


def test_no_file_cites_notes_outside_the_repository() -> None:
    files = _tracked("*.py", "*.md", "*.yaml", "*.toml")
    found = [f"{p.relative_to(REPO)}:{i}" for p in files if "docs/experiments/" not in str(p)
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE_NOTES in line]
    assert not found, found


def test_no_python_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in _tracked("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
