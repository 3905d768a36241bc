"""Classification resolution, sidecars and filter expressions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.kb.classification import (
    Classification as C,
)
from services.kb.classification import (
    PathRule,
    labels_from_rules,
    most_restrictive,
    parse_label,
)
from services.kb.filters import SearchFilter, literal
from services.kb.sidecar import SidecarError, read_sidecar
from tests.support import SAMPLES


def test_most_restrictive_wins_and_default_applies() -> None:
    assert most_restrictive([None, None], C.INTERNAL) is C.INTERNAL
    assert most_restrictive([C.PUBLIC], C.INTERNAL) is C.PUBLIC
    assert most_restrictive([C.PUBLIC, C.CONFIDENTIAL, C.INTERNAL], C.PUBLIC) is C.CONFIDENTIAL


def test_path_rules_match_globs() -> None:
    rules = [PathRule("confidential/*", C.CONFIDENTIAL), PathRule("*.faq.md", C.PUBLIC)]
    assert labels_from_rules("confidential/plan.md", rules) == [C.CONFIDENTIAL]
    assert labels_from_rules("docs\\product.faq.md", rules) == [C.PUBLIC]
    assert labels_from_rules("handbook/x.md", rules) == []


def test_parse_label_names_where_and_allowed() -> None:
    assert parse_label(" Confidential ", "x") is C.CONFIDENTIAL
    with pytest.raises(
        ValueError,
        match="sidecar.yaml: classification 'secret' is not one of: public, internal, confidential",
    ):
        parse_label("secret", "sidecar.yaml")


def test_sample_sidecar_marks_memo_confidential() -> None:
    side = read_sidecar(SAMPLES / "confidential/project-falcon-acquisition.md")
    assert side.classification is C.CONFIDENTIAL
    assert side.metadata.get("department")


def test_bad_sidecar_is_a_named_error(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text("hello")
    (tmp_path / "a.md.meta.yaml").write_text("classification: secret\n")
    with pytest.raises(SidecarError, match="a.md.meta.yaml"):
        read_sidecar(doc)
    (tmp_path / "a.md.meta.yaml").write_text("clasification: public\n")
    with pytest.raises(SidecarError, match="unknown keys"):
        read_sidecar(doc)


def test_literals_are_escaped() -> None:
    assert literal('" or 1==1') == '"\\" or 1==1"'
    assert literal("a\\b") == '"a\\\\b"'
    assert literal(True) == "true" and literal(3) == "3"
    with pytest.raises(ValueError, match="control characters"):
        literal("a\nb")


def test_filter_expression_uses_schema_fields_only() -> None:
    f = SearchFilter(classifications=[C.PUBLIC], sources=['x" or 1==1 or "'], metadata={"team": "ops"})
    assert f.expression() == (
        '(classification in ["public"]) and (source in ["x\\" or 1==1 or \\""]) '
        'and (metadata["team"] == "ops")'
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"metadata": {'team"] or 1==1 or metadata["x': "a"}},
        {"metadata": {"1abc": "a"}},
        {"classifications": ["secret"]},
        {"sources": ["a\x00b"]},
        {"unknown": 1},
    ],
)
def test_filter_rejects_unsafe_input(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SearchFilter(**bad)


def test_path_rules_match_any_trailing_part_of_the_path() -> None:
    rules = [PathRule("confidential/*", C.CONFIDENTIAL)]
    assert labels_from_rules("/srv/docs/confidential/plan.md", rules) == [C.CONFIDENTIAL]
    assert labels_from_rules("/srv/docs/public/plan.md", rules) == []


def test_doc_ids_are_readable_and_never_collide() -> None:
    from services.kb.ingest import doc_id_for, validate_doc_id

    assert doc_id_for("handbook/employee-handbook.md") == "handbook--employee-handbook.md"
    ids = {doc_id_for(s) for s in ("A B.md", "a b.md", "a-b.md", "a_b.md")}
    assert len(ids) == 4
    for source in ("_index.md", "Ünïcode Plan.PDF", "x" * 400, "../../etc/passwd"):
        assert validate_doc_id(doc_id_for(source))
