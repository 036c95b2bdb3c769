"""The README stays a short user's page (issue 39: under 12 KB; the rest lives in docs/), and every link it
makes into the repository, anchors included, still lands somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_the_readme_is_under_12_kb():
    assert README.stat().st_size < 12 * 1024, f"README.md is {README.stat().st_size:,} bytes: move detail to docs/"


def test_every_link_of_the_readme_lands():
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve()
        if not file.is_relative_to(ROOT):
            continue  # outside this repository (the shared specification): not this README's to keep
        assert file.exists(), target
        if anchor:
            assert anchor in _anchors(file.read_text()), target
