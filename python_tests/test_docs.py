"""docs/design.md is the design document the code points to: every `docs/design.md §N` reference
in the tree names a section that exists, and no reference to a document outside the repository
remains. Text files only, no imports of the package: fast."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")
SCANNED_DIRS = ("dia_fused", "csrc", "bench", "python_tests", "docs", ".ci")
SCANNED_FILES = ("setup.py", "CMakeLists.txt", "README.md", "pyproject.toml", "MANIFEST.in")
TEXT_SUFFIXES = (".py", ".cu", ".cuh", ".h", ".cpp", ".sh", ".md", ".toml", ".txt", ".in", ".cfg")
SKIPPED_DIRS = {"__pycache__", "results", ".pytest_cache", ".benchmarks"}

# "docs/design.md §2" or "docs/design.md §1, §2" or "docs/design.md §4.1"
REFERENCE = re.compile(r"docs/design\.md ((?:§\d+(?:\.\d+)?(?:, |,| and )?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
# documents that are not in the repository (built from parts so that this file does not match)
STALE = ("CONTEXT" + ".md", "DESIGN" + " section", "DESIGN" + " §")


def scanned_files():
    for name in SCANNED_FILES:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            yield path
    for top in SCANNED_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                if name.endswith(TEXT_SUFFIXES) or (top == ".ci" and "." not in name):
                    yield os.path.join(folder, name)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def design_sections():
    """{"1", "2", ..., "1.1", ...}: the numbers of the headings of docs/design.md."""
    text = read(DESIGN)
    top = re.findall(r"^## (\d+)\. \S", text, flags=re.MULTILINE)
    sub = re.findall(r"^### (\d+\.\d+) \S", text, flags=re.MULTILINE)
    return top, set(top) | set(sub)


def test_design_has_numbered_sections_one_to_six_in_order():
    top, _ = design_sections()
    assert top == [str(i) for i in range(1, 7)], f"docs/design.md top-level sections: {top}"


def test_subsections_are_numbered_within_their_section():
    text = read(DESIGN)
    section = None
    for line in text.splitlines():
        top = re.match(r"^## (\d+)\. ", line)
        if top:
            section = top.group(1)
        sub = re.match(r"^### (\d+)\.\d+ ", line)
        if sub:
            assert sub.group(1) == section, f"docs/design.md: {line!r} is under section {section}"


def references():
    """(file relative to the root, line number, section number) of every reference."""
    found = []
    for path in scanned_files():
        rel = os.path.relpath(path, ROOT)
        for number, line in enumerate(read(path).splitlines(), 1):
            if rel == os.path.join("docs", "design.md"):
                sections = SECTION.findall(line)  # the document refers to itself by § alone
            else:
                sections = [
                    s for m in REFERENCE.finditer(line) for s in SECTION.findall(m.group(1))
                ]
            found += [(rel, number, s) for s in sections]
    return found


def test_every_reference_names_an_existing_section():
    _, sections = design_sections()
    found = references()
    assert len(found) >= 10, f"expected the code to point to docs/design.md, found {found}"
    missing = [f"{rel}:{line}: §{s}" for rel, line, s in found if s not in sections]
    assert not missing, "references to sections that docs/design.md does not have:\n" + "\n".join(
        missing
    )


@pytest.mark.parametrize("stale", STALE)
def test_no_reference_to_documents_outside_the_repository(stale):
    hits = []
    for path in scanned_files():
        for number, line in enumerate(read(path).splitlines(), 1):
            if stale in line:
                hits.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not hits, (
        f"{stale!r} points outside the repository; use docs/design.md §N:\n" + "\n".join(hits)
    )


def test_readme_links_the_design_document():
    assert "docs/design.md" in read(os.path.join(ROOT, "README.md"))


# files the README names that a clone does not have, each written by a command it gives
README_OUTPUTS = {"dia_fused/auto_backend.json": "bench/make_auto_table.py"}


def test_readme_names_only_files_a_clone_has():
    text = read(os.path.join(ROOT, "README.md"))
    paths = set(re.findall(r"\b(?:dia_fused|bench|python_tests|docs|csrc)/[\w./<>*-]*\w", text))
    assert len(paths) >= 10, paths
    missing = [
        p
        for p in sorted(paths)
        if not os.path.exists(os.path.join(ROOT, p))
        and not (p in README_OUTPUTS and README_OUTPUTS[p] in text)
    ]
    assert not missing, f"README.md names paths a clone does not have: {missing}"
    assert "none shipped" not in text and "<the CPU wheel index>" not in text
