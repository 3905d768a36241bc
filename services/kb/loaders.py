"""Turn uploaded bytes into cleaned text blocks with page/section positions.

Loaders take bytes and a name (not a path) so that files from disk and uploads
through the gateway go through exactly the same checks. Every failure is a
:class:`DocumentRejected` naming the file and what is wrong with it.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import yaml

from services.kb.access import Acl, AclError
from services.kb.classification import Classification, parse_label
from services.kb.cleaning import clean_text, strip_repeated_lines
from services.kb.errors import DocumentRejected
from services.kb.models import Block, LoadedDocument

Loader = Callable[[bytes, str], LoadedDocument]

MAX_DOCX_UNPACKED = 256 * 1024 * 1024
"""A .docx whose parts unpack to more than this is refused before parsing."""

CONTENT_TYPES: dict[str, tuple[str, ...]] = {
    ".txt": ("text/plain",),
    ".md": ("text/markdown", "text/x-markdown", "text/plain"),
    ".markdown": ("text/markdown", "text/x-markdown", "text/plain"),
    ".html": ("text/html",),
    ".htm": ("text/html",),
    ".pdf": ("application/pdf",),
    ".docx": ("application/vnd.openxmlformats-officedocument.wordprocessingml.document",),
}
"""Supported extensions and the content types an upload of each may declare."""


def suffix_of(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).suffix.lower()


def load_document(data: bytes, name: str) -> LoadedDocument:
    """Parse ``data`` as the format its ``name`` says, or reject it clearly."""
    suffix = suffix_of(name)
    loader = _LOADERS.get(suffix)
    if loader is None:
        allowed = ", ".join(sorted(_LOADERS))
        raise DocumentRejected(name, f"unsupported file type {suffix or '(none)'!r}; supported: {allowed}")
    if not data or not data.strip():
        raise DocumentRejected(name, "file is empty")
    doc = loader(data, name)
    if not any(b.text.strip() for b in doc.blocks):
        raise DocumentRejected(name, "no text could be extracted (scanned image or empty body?)")
    return doc


# -- text formats -------------------------------------------------------------------------------


def decode_text(data: bytes, name: str) -> str:
    """Decode UTF-8 (with or without BOM) or BOM-marked UTF-16; refuse binary data."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DocumentRejected(name, f"invalid UTF-16 text: {exc.reason}") from None
    if b"\x00" in data[:65536]:
        raise DocumentRejected(name, "looks like a binary file (contains NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRejected(
            name,
            f"is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 and upload again",
        ) from None
    sample = text[:65536]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\n\r\t\f")
    if sample and controls / len(sample) > 0.05:
        raise DocumentRejected(name, "looks like a binary file (many control characters), not text")
    return text


_UNDERLINE = re.compile(r"^(=+|-+)\s*$")


def load_txt(data: bytes, name: str) -> LoadedDocument:
    """Plain text; ALL-CAPS lines and ``===``/``---`` underlined lines start sections."""
    lines = decode_text(data, name).replace("\r\n", "\n").split("\n")
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line and _UNDERLINE.match(nxt) and len(nxt) >= max(3, len(line) // 2):
            sections.append((line, []))
            i += 2
            continue
        if _looks_like_caps_heading(line):
            sections.append((line.rstrip(":"), []))
        else:
            sections[-1][1].append(lines[i])
        i += 1
    title = next((s for s, _ in sections if s), None)
    return LoadedDocument(name=name, blocks=_blocks(sections), title=title)


def _looks_like_caps_heading(line: str) -> bool:
    words = line.split()
    return 0 < len(words) <= 8 and line.isupper() and any(c.isalpha() for c in line)


def _blocks(sections: list[tuple[str | None, list[str]]], page: int | None = None) -> list[Block]:
    out = []
    for heading, body in sections:
        text = clean_text("\n".join(body))
        if text:
            out.append(Block(text=text, page=page, section=heading))
    return out


_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_MARKUP = re.compile(r"(\*\*|__|`+|~~)")


def split_front_matter(text: str, name: str) -> tuple[dict[str, Any], str]:
    """YAML front-matter (``---`` ... ``---``) and the body after it."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise DocumentRejected(name, f"front-matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise DocumentRejected(name, "front-matter must be a YAML mapping")
    return meta, text[match.end() :]


def declared_label(meta: dict[str, Any], name: str, where: str) -> Classification | None:
    if "classification" not in meta:
        return None
    try:
        return parse_label(meta["classification"], f"{name} ({where})")
    except ValueError as exc:
        raise DocumentRejected(name, str(exc).split(": ", 1)[1]) from None


def declared_acl(meta: dict[str, Any], name: str, where: str) -> Acl | None:
    """The ``groups``/``users`` a file states for itself, if any."""
    if "groups" not in meta and "users" not in meta:
        return None
    try:
        return Acl.of(names(meta.get("groups"), "groups"), names(meta.get("users"), "users"), where)
    except AclError as exc:
        raise DocumentRejected(name, str(exc)) from None


def names(value: object, key: str) -> list[str]:
    """A list of names from YAML/JSON: a string or a list of strings (``None``: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise AclError(f"{key} must be a name or a list of names, not {value!r}")


def load_markdown(data: bytes, name: str) -> LoadedDocument:
    """Markdown with optional YAML front-matter (title, classification, metadata)."""
    meta, body = split_front_matter(decode_text(data, name), name)
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    in_fence = False
    for raw in body.split("\n"):
        if raw.strip().startswith("```"):
            in_fence = not in_fence
            continue
        heading = None if in_fence else _MD_HEADING.match(raw)
        if heading:
            sections.append((_md_inline(heading.group(2)), []))
        else:
            sections[-1][1].append(raw if in_fence else _md_inline(raw))
    title = meta.get("title") or next((s for s, _ in sections if s), None)
    extra = {k: v for k, v in meta.items() if k not in ("title", "classification", "groups", "users")}
    return LoadedDocument(
        name=name,
        blocks=_blocks(sections),
        title=str(title) if title else None,
        declared=declared_label(meta, name, "front-matter"),
        declared_acl=declared_acl(meta, name, "front-matter"),
        metadata=_scalar_metadata(extra),
    )


def _md_inline(line: str) -> str:
    line = _MD_LINK.sub(r"\1", line)
    line = re.sub(r"^\s*>\s?", "", line)
    line = re.sub(r"^\s*[*+]\s+", "- ", line)
    return _MD_MARKUP.sub("", line)


def _scalar_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Keep only JSON-scalar metadata with identifier-like keys (filterable later)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            if isinstance(value, str | int | float | bool):
                out[key] = value
            elif value is not None:
                out[key] = str(value)
    return out


_HTML_DROP = ("script", "style", "nav", "header", "footer", "aside", "noscript", "form", "template")
_HTML_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
_HTML_TEXT = ("p", "li", "td", "th", "pre", "blockquote", "dd", "dt", "figcaption")


def load_html(data: bytes, name: str) -> LoadedDocument:
    """HTML body text by section; navigation, headers and footers are boilerplate."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(data, name), "html.parser")
    declared = None
    meta_tag = soup.find("meta", attrs={"name": "classification"})
    if meta_tag is not None and meta_tag.get("content"):
        declared = declared_label({"classification": meta_tag["content"]}, name, "<meta>")
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else None
    for tag in soup(list(_HTML_DROP)):
        tag.decompose()
    root = soup.body or soup
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for el in root.find_all([*_HTML_HEADINGS, *_HTML_TEXT]):
        if el.name in _HTML_HEADINGS:
            sections.append((el.get_text(" ", strip=True), []))
        elif not el.find_parent(_HTML_TEXT):  # nested <p> in <li>: count once
            text = el.get_text(" ", strip=True)
            if text:
                sections[-1][1].append("- " + text + "\n" if el.name == "li" else text + "\n\n")
    if not any(body for _, body in sections):
        sections = [(None, [root.get_text("\n", strip=True)])]
    title = title or next((s for s, _ in sections if s), None)
    return LoadedDocument(name=name, blocks=_blocks(sections), title=title, declared=declared)


# -- binary formats -----------------------------------------------------------------------------


def load_pdf(data: bytes, name: str) -> LoadedDocument:
    """PDF text per page, with running headers/footers removed."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.lstrip()[:5].startswith(b"%PDF-"):
        raise DocumentRejected(name, "is not a PDF (missing %PDF- header)")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise DocumentRejected(name, "PDF is encrypted; upload an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
        title = str(info.title) if info and info.title else None
    except DocumentRejected:
        raise
    except PyPdfError as exc:
        raise DocumentRejected(name, f"corrupt or unreadable PDF: {exc}") from None
    except MemoryError:
        raise  # the parser's memory limit (services.kb.sandbox) says so
    except Exception as exc:  # a hostile PDF can raise anything from zlib to RecursionError
        raise DocumentRejected(name, f"corrupt or unreadable PDF ({type(exc).__name__}): {exc}") from None
    if not pages:
        raise DocumentRejected(name, "PDF has no pages")
    blocks = []
    for number, text in enumerate(strip_repeated_lines(pages), start=1):
        cleaned = clean_text(text)
        if cleaned:
            blocks.append(Block(text=cleaned, page=number))
    return LoadedDocument(name=name, blocks=blocks, title=title)


def load_docx(data: bytes, name: str) -> LoadedDocument:
    """Word paragraphs and tables; Heading/Title styles start sections."""
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise DocumentRejected(name, "is not a .docx file (not a ZIP package)")
    try:
        unpacked = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DocumentRejected(name, f"corrupt or unreadable .docx: {exc}") from None
    if unpacked > MAX_DOCX_UNPACKED:
        raise DocumentRejected(name, f"unpacks to {unpacked} bytes, over {MAX_DOCX_UNPACKED} (a ZIP bomb?)")
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DocumentRejected(name, f"corrupt or unreadable .docx: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # lxml raises its own hierarchy for broken XML parts
        raise DocumentRejected(name, f"corrupt or unreadable .docx: {exc}") from None
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    title = document.core_properties.title or None
    for para in document.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        text = para.text.strip()
        if not text:
            continue
        if style.startswith("Heading") or style == "Title":
            sections.append((text, []))
            if style == "Title" and not title:
                title = text
        else:
            sections[-1][1].append("- " + text + "\n" if "List" in style else text + "\n\n")
    for table in document.tables:
        rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in table.rows]
        sections[-1][1].append("\n\n".join(rows) + "\n\n")
    title = title or next((s for s, _ in sections if s), None)
    return LoadedDocument(name=name, blocks=_blocks(sections), title=title)


_LOADERS: dict[str, Loader] = {
    ".txt": load_txt,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
}
assert set(_LOADERS) == set(CONTENT_TYPES)
