"""docs/pipeline-spec.md embeds the generated component reference; it must match the code."""

from __future__ import annotations

from pathlib import Path

from edgewise.pipeline import registry
from edgewise.pipeline.reference import BEGIN, END, markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipeline-spec.md"


def test_the_component_reference_in_the_docs_matches_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    embedded = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert embedded == markdown(), (
        "docs/pipeline-spec.md is out of date: regenerate the part between the markers with "
        "`edgewise components --markdown`"
    )


def test_every_registered_component_is_documented_and_loads() -> None:
    text = markdown()
    assert "(not available" not in text
    for table in registry.KINDS.values():
        for name in table:
            assert f"### `{name}`" in text
