"""The README's config table is the one generated from the config dataclasses."""
import os

from distft import config
from distft.config import doc as configdoc

from conftest import ROOT


def test_readme_config_table_is_generated_from_the_dataclasses():
    with open(os.path.join(ROOT, configdoc.PAGE)) as fh:
        assert configdoc.page_table(fh.read()) == configdoc.table()


def test_every_config_key_is_in_the_table_with_a_meaning():
    keys = {row[0] for row in configdoc.rows()}
    doc = config.Config().to_dict()
    assert keys == {f"`{section}.{key}`" for section, values in doc.items() for key in values}
    assert all(meaning for _, _, meaning in configdoc.rows())
