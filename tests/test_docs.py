"""The documentation says what the code does: the generated reference is current, links resolve, the
README stays a front door, and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO

DOCS = REPO / "docs"


def render() -> str:
    """What `make docs` writes to docs/reference.md."""
    script = REPO / "scripts" / "config_reference.py"
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout


def test_the_configuration_reference_is_current_and_documents_every_option() -> None:
    """`make docs` regenerates it; this fails when an option changed and the page did not."""
    text = render()
    assert (DOCS / "reference.md").read_text(encoding="utf-8") == text
    undocumented = [
        line for line in text.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert not undocumented, undocumented


def test_links_between_pages_resolve() -> None:
    pages = [REPO / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make install && make run" in readme and "make test" in readme


def test_nothing_cites_a_document_outside_the_repository() -> None:
    for path in [
        *(REPO / "outlier_study").rglob("*.py"),
        *(REPO / "outlier_study").rglob("*.yaml"),
        *DOCS.glob("*.md"),
    ]:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN §" not in text and "shared/DESIGN" not in text, path
