"""Parsing in a child process with limits: hostile documents are rejected, this process lives on.

Real parsers on real files built here: a PDF of 100,000 pages, a DOCX whose XML unpacks to
200 MB, HTML nested 100,000 deep.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from services.kb import sandbox
from services.kb.errors import DocumentRejected
from services.kb.sandbox import ParserLimits, parse_isolated
from tests.support import SAMPLES

ROOMY = ParserLimits(cpu_s=60, memory_mb=2048, timeout_s=120)


@pytest.fixture(scope="module")
def huge_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(100_000):
        writer.add_blank_page(612, 792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_unpacking_to(megabytes: int) -> bytes:
    """The sample DOCX with its body replaced by ``megabytes`` of paragraphs (deflated: ~1 MB)."""
    src = zipfile.ZipFile(io.BytesIO((SAMPLES / "policies/information-security-policy.docx").read_bytes()))
    para = b"<w:p><w:r><w:t>lorem ipsum dolor sit amet</w:t></w:r></w:p>" * 10_000
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename != "word/document.xml":
                z.writestr(item, data)
                continue
            head = data.partition(b"<w:body>")[0]
            with z.open("word/document.xml", "w") as part:
                part.write(head + b"<w:body>")
                for _ in range(megabytes * 1024 * 1024 // len(para)):
                    part.write(para)
                part.write(b"</w:body></w:document>")
    return out.getvalue()


def test_a_sample_parses_as_in_process() -> None:
    from services.kb.loaders import load_document

    for rel in ("handbook/employee-handbook.md", "policies/travel-and-expense-policy.pdf"):
        data = (SAMPLES / rel).read_bytes()
        assert parse_isolated(data, rel, ROOMY) == load_document(data, rel)


def test_a_rejection_keeps_its_reason() -> None:
    with pytest.raises(DocumentRejected, match="is not a PDF"):
        parse_isolated(b"hello", "fake.pdf", ROOMY)


def test_a_pdf_of_100000_pages_runs_out_of_cpu(huge_pdf: bytes) -> None:
    with pytest.raises(DocumentRejected, match=r"more than 2 s of CPU \(ingest.parser_cpu_s\)"):
        parse_isolated(huge_pdf, "pages.pdf", ParserLimits(cpu_s=2, memory_mb=2048, timeout_s=120))


def test_a_parse_past_the_wall_clock_is_killed(huge_pdf: bytes) -> None:
    with pytest.raises(DocumentRejected, match=r"longer than 1 s \(ingest.parser_timeout_s\)"):
        parse_isolated(huge_pdf, "pages.pdf", ParserLimits(cpu_s=60, memory_mb=2048, timeout_s=1))
    # the next document is parsed as if nothing happened
    assert parse_isolated(b"# T\n\nafter", "next.md", ROOMY).title == "T"


def test_a_docx_unpacking_to_200_mb_runs_out_of_memory() -> None:
    data = docx_unpacking_to(200)
    assert len(data) < 2 * 1024 * 1024  # small enough for any upload limit
    with pytest.raises(DocumentRejected, match=r"more than 512 MB \(ingest.parser_memory_mb\)"):
        parse_isolated(data, "bomb.docx", ParserLimits(cpu_s=60, memory_mb=512, timeout_s=120))


def test_deeply_nested_html_gives_its_text_or_a_reason() -> None:
    depth = 100_000
    html = b"<html><body>" + b"<div>" * depth + b"deep text" + b"</div>" * depth + b"</body></html>"
    try:
        doc = parse_isolated(html, "nested.html", ROOMY)
    except DocumentRejected as exc:
        assert "nested" in exc.reason
    else:
        assert doc.text.strip() == "deep text"


def test_after_limits_are_hit_the_next_document_parses(huge_pdf: bytes) -> None:
    for limits in (ParserLimits(1, 2048, 60), ParserLimits(60, 256, 60)):
        with pytest.raises(DocumentRejected):
            parse_isolated(huge_pdf, "pages.pdf", limits)
    assert parse_isolated(b"still here", "a.txt", ROOMY).text.strip() == "still here"


def test_the_parser_sees_none_of_the_gateways_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALTRACK_GATEWAY__API_KEY", "secret-key-the-parser-must-not-see")
    sandbox._server.close()  # a fresh server, started with the secret in this process' environment
    assert parse_isolated(b"hello", "a.txt", ROOMY).text.strip() == "hello"
    proc = sandbox._server._proc
    assert proc is not None
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    assert b"secret-key-the-parser-must-not-see" not in environ and b"DUALTRACK_" not in environ


def test_parsing_works_with_descriptors_past_1024() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    sandbox._server.close()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:  # the parser server's pipes now get numbers select() cannot take
        assert parse_isolated(b"# T\n\nmany files open", "many.md", ROOMY).title == "T"
    finally:
        for fd in held:
            os.close(fd)
        sandbox._server.close()


def test_a_child_that_streams_more_than_it_could_hold_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser subverted by its input could write without end instead of answering: the server
    stops reading past the memory limit (an honest answer is built in memory, so it fits)."""

    def flood(writer: int, _data: bytes, _name: str, _limits: ParserLimits) -> None:
        block = b"x" * (1 << 20)
        with os.fdopen(writer, "wb") as out:
            for _ in range(64):
                out.write(block)

    monkeypatch.setattr(sandbox, "_child", flood)
    answer = sandbox._one(b"text", "a.txt", ParserLimits(cpu_s=10, memory_mb=8, timeout_s=30))
    assert answer == {"rejected": "the parser's answer is over 8 MB (ingest.parser_memory_mb)"}
