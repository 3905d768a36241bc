"""Loaders on the shipped sample corpus and on broken input."""

from __future__ import annotations

import io

import pytest

from services.kb.classification import Classification
from services.kb.errors import DocumentRejected
from services.kb.loaders import load_document
from tests.support import SAMPLES


def load(rel: str):
    return load_document((SAMPLES / rel).read_bytes(), rel)


def test_markdown_front_matter_title_sections_and_label() -> None:
    doc = load("handbook/employee-handbook.md")
    assert doc.declared is Classification.INTERNAL
    assert doc.title and "Handbook" in doc.title
    sections = {b.section for b in doc.blocks}
    assert len(sections) >= 4
    assert "---" not in doc.text and "classification:" not in doc.text
    assert "**" not in doc.text


def test_public_front_matter() -> None:
    assert load("products/robot-fleet-faq.md").declared is Classification.PUBLIC


def test_confidential_markdown_has_no_front_matter_label() -> None:
    # its label comes from the sidecar, applied by the ingest step
    assert load("confidential/project-falcon-acquisition.md").declared is None


def test_pdf_pages_headers_footers_and_hyphenation() -> None:
    doc = load("policies/travel-and-expense-policy.pdf")
    assert [b.page for b in doc.blocks] == [1, 2, 3]
    text = doc.text
    assert "reimbursement" in text and "accommodation" in text
    assert "reimburse- ment" not in text and "reimburse-ment" not in text
    assert "Page 1 of 3" not in text and "Page 2 of 3" not in text
    assert "Northwind Robotics - Travel and Expense Policy" not in text


def test_docx_headings_become_sections() -> None:
    doc = load("policies/information-security-policy.docx")
    sections = [b.section for b in doc.blocks if b.section]
    assert len(sections) >= 8
    assert any("Password" in s or "Authentication" in s for s in sections)


def test_html_drops_navigation_header_footer() -> None:
    raw = (SAMPLES / "runbooks/incident-response.html").read_text()
    doc = load("runbooks/incident-response.html")
    assert "SEV1" in doc.text
    assert doc.title
    # the <nav> of the sample is not content
    import re

    nav = re.search(r"<nav.*?</nav>", raw, re.S)
    assert nav is not None
    nav_text = re.sub(r"<[^>]+>", " ", nav.group(0)).split()
    assert not all(word in doc.text.split() for word in nav_text)


def test_txt_underlined_and_caps_headings() -> None:
    data = b"OVERVIEW\nThe service keeps data.\n\nRecovery steps\n==============\nPromote the replica.\n"
    doc = load_document(data, "r.txt")
    assert [b.section for b in doc.blocks] == ["OVERVIEW", "Recovery steps"]


def test_utf8_bom_and_utf16_are_decoded() -> None:
    assert "café" in load_document("\ufeffcafé menu".encode(), "a.txt").text
    assert "café" in load_document("café menu".encode("utf-16"), "a.txt").text


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"", "empty.txt", "file is empty"),
        (b"   \n\n ", "blank.md", "file is empty"),
        (b"hello", "notes.xlsx", "unsupported file type '.xlsx'"),
        (b"hello", "README", "unsupported file type '(none)'"),
        (b"\x00\x01\x02binary\x00junk" * 50, "image.txt", "binary file"),
        ("caf\xe9 au lait".encode("latin-1"), "latin1.txt", "not valid UTF-8 (byte 0xe9 at offset 3)"),
        (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "broken.pdf", "PDF"),
        (b"this is not a pdf at all", "fake.pdf", "is not a PDF"),
        (b"PK\x03\x04 truncated zip", "broken.docx", ".docx"),
        (b"plain text", "fake.docx", "not a ZIP package"),
        (b"---\nclassification: top-secret\n---\nbody", "bad.md", "'top-secret' is not one of"),
        (b"---\n: [unclosed\n---\nbody", "bad2.md", "front-matter is not valid YAML"),
    ],
)
def test_bad_input_is_rejected_with_named_reason(data: bytes, name: str, reason: str) -> None:
    with pytest.raises(DocumentRejected) as info:
        load_document(data, name)
    assert info.value.name == name
    assert reason in info.value.reason
    assert str(info.value).startswith(name + ": ")


def test_truncated_real_pdf_is_rejected_or_partial_never_crashes() -> None:
    data = (SAMPLES / "policies/travel-and-expense-policy.pdf").read_bytes()
    try:
        doc = load_document(data[: len(data) // 3], "cut.pdf")
    except DocumentRejected as exc:
        assert "cut.pdf" in str(exc)
    else:
        assert doc.blocks  # pypdf recovered some pages; what it returns is real text


def test_docx_with_corrupt_xml_part_is_rejected() -> None:
    import zipfile

    src = zipfile.ZipFile(io.BytesIO((SAMPLES / "policies/information-security-policy.docx").read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "word/document.xml":
                data = data[: len(data) // 2]
            z.writestr(item, data)
    with pytest.raises(DocumentRejected, match="corrupt or unreadable .docx"):
        load_document(out.getvalue(), "broken.docx")


def test_docx_zip_bomb_is_refused_before_parsing() -> None:
    import zipfile

    from services.kb.loaders import MAX_DOCX_UNPACKED

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", b"\0" * (MAX_DOCX_UNPACKED + 1))
    with pytest.raises(DocumentRejected, match="ZIP bomb"):
        load_document(out.getvalue(), "bomb.docx")
