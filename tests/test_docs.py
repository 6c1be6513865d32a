"""The README and docs/ point only at things the repository has: every relative link names a file in
it, and every #anchor a heading of that file (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings inside code blocks
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_slug_matches_github():
    assert slug("Why `encoder.opt.onnx` exists") == "why-encoderoptonnx-exists"
    assert slug("Serving (supmae-serve): REST API") == "serving-supmae-serve-rest-api"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.is_file() or (anchor and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to what the repository does not have: {broken}"


# Markdown files of other projects that the docs name as such (with their repository), and outputs
OTHER_FILES = {"PRETRAIN.md", "FINETUNE.md", "$OUT/summary.md"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_markdown_file_named_is_in_the_repository(doc):
    """A doc that cites `SOMETHING.md` sends the reader there: it must exist (ANCHORS.md did not)."""
    names = set(re.findall(r"[$\w./-]*\.md\b", doc.read_text())) - OTHER_FILES
    missing = [n for n in names if not (doc.parent / n).is_file() and not (ROOT / n).is_file()]
    assert not missing, f"{doc.relative_to(ROOT)} names files the repository does not have: {missing}"
