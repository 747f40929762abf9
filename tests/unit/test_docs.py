"""The README and docs/: every relative link and anchor resolves, the config table is the one
generated from the config dataclasses, and the README stays short."""
import os
import re

import pytest

from distft import config
from distft.config import doc as configdoc

from conftest import ROOT

PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens, repeats numbered."""
    found, seen = set(), {}
    in_code = False
    for line in open(os.path.join(ROOT, path)):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    text = open(os.path.join(ROOT, page)).read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code is not linked
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # another site
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved})")
    assert broken == []


def test_the_readme_is_at_most_300_lines():
    with open(os.path.join(ROOT, "README.md")) as fh:
        assert sum(1 for _ in fh) <= 300


def test_config_page_table_is_generated_from_the_dataclasses():
    with open(os.path.join(ROOT, configdoc.PAGE)) as fh:
        assert configdoc.page_table(fh.read()) == configdoc.table()


def test_every_config_key_is_in_the_table_with_a_meaning():
    keys = {row[0] for row in configdoc.rows()}
    doc = config.Config().to_dict()
    assert keys == {f"`{section}.{key}`" for section, values in doc.items() for key in values}
    assert all(meaning for _, _, meaning in configdoc.rows())
