"""The docs stay true: the config reference is the defaults table's, and every relative link
of the README and of docs/*.md points at a file that exists."""

import re

import pytest

from conftest import REPO
from tr_align.tools import config_docs

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_config_reference_is_generated_from_the_defaults_table():
    page = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    assert page == config_docs.markdown(), (
        "docs/configs.md is stale: python -m tr_align.tools.config_docs > docs/configs.md"
    )
    # and it is the table's: a meaning appears with its key
    assert "| `loss.beta` | `0.1` | the loss's beta (KL strength) |" in page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"(https?:|mailto:|#)", target):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files: {missing}"


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, page.name
