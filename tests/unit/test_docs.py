"""The documentation: every stage kind's page and the recipe's settings are generated from the typed configs,
and a setting without a description stops the build (so does a broken link: `mkdocs build --strict` in CI)."""

import importlib.util
from pathlib import Path

import pytest
from pydantic import Field

from tasks.machinery.training import Section

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_settings", ROOT / "docs" / "gen_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kind_page_lists_every_setting_with_its_description():
    from tasks.kinds import kinds

    gen = _generator()
    for name, kind in kinds().items():
        page = gen.kind_page(kind)
        assert page.startswith(f"# {name}\n") and kind.description in page
        for field_name, field in kind.config.model_fields.items():
            settings = page.split("\n## Settings\n", 1)[1]
            row = next((line for line in settings.splitlines() if line.startswith(f"| `{field_name}` |")), None)
            assert row is not None, (name, field_name)
            assert " ".join(field.description.split()).replace("|", "\\|") in row, (name, field_name)
        for slot in kind.inputs:
            assert f"| `{slot}` |" in page, (name, slot)
    assert "| `training.learning_rate` |" in gen.kind_page(kinds()["sft"]), "nested sections are listed"


def test_a_setting_without_a_description_stops_the_build():
    gen = _generator()

    class Undocumented(Section):
        documented: int = Field(1, description="Has one.")
        silent: int = 2

    with pytest.raises(gen.MissingDescription, match="silent"):
        gen.table(Undocumented, "a test kind")


def test_the_site_navigation_names_a_page_per_kind():
    import yaml

    from tasks.kinds import kinds

    nav = (ROOT / "mkdocs.yml").read_text()
    for name in kinds():
        assert f"kinds/{name}.md" in nav, name
    assert yaml.safe_load(nav.replace("!!python/name:", ""))["strict"] is True
