"""Uploaded documents: checking them and getting their text out (.txt, .md, .html, .pdf).

Every rejection is a SwitchboardError with its own code, so HTTP clients get a clear 4xx JSON error
and nothing is stored: empty file, unsupported type, over the size limit, unreadable (broken) file,
or a file with no extractable text.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePath

from core.errors import BadRequest, TooLong

log = logging.getLogger(__name__)

KINDS = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z, not $: "$" accepts a trailing newline
DEFAULT_COLLECTION = "default"


class EmptyDocument(BadRequest):
    code = "empty_document"


class UnsupportedType(BadRequest):
    code, http_status = "unsupported_type", 415


class DocumentTooLarge(TooLong):
    code, http_status = "too_large", 413


class UnreadableDocument(BadRequest):
    code, http_status = "unreadable_document", 422


@dataclass
class Extracted:
    """A document's checked upload and its plain text (with page starts for PDFs)."""

    name: str
    kind: str
    data: bytes
    sha256: str
    text: str
    page_starts: list[int] = field(default_factory=list)  # character offset where each page starts

    @property
    def extension(self) -> str:
        return PurePath(self.name).suffix.lower()


def clean_name(filename: str | None) -> str:
    """The file's base name without directories or control characters (it is shown on the page)."""
    name = PurePath((filename or "").replace("\\", "/")).name
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:200]


def check_collection(value: object) -> str:
    if value is None or value == "":
        return DEFAULT_COLLECTION
    if not isinstance(value, str) or not COLLECTION.match(value):
        raise BadRequest("collection must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def kind_of(name: str) -> str:
    ext = PurePath(name).suffix.lower()
    if ext not in KINDS:
        shown = ext or "(no extension)"
        raise UnsupportedType(f"{name or 'the file'}: type {shown} is not supported; upload .txt, .md, .html or .pdf")
    return KINDS[ext]


def normalize_text(text: str) -> str:
    """Unix newlines, no NULs, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t\f\v]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def decode_text(data: bytes, name: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192]:
        raise UnreadableDocument(f"{name}: this looks like a binary file, not text")
    return data.decode("cp1252", errors="replace")


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; block elements become line breaks."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "tr",
        "table",
        "section",
        "article",
        "header",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "hr",
        "dt",
        "dd",
        "title",
        "main",
        "nav",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    body = "".join(parser.parts)
    body = "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in body.split("\n"))
    title = " ".join("".join(parser.title).split())
    if title and title not in body[: len(title) + 200]:
        body = title + "\n\n" + body
    return body


def pdf_to_text(data: bytes, name: str) -> tuple[str, list[int]]:
    """Text of every page (pypdf) and where each page starts; a broken file is UnreadableDocument."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.lstrip()[:5].startswith(b"%PDF-"):
        raise UnreadableDocument(f"{name}: not a PDF file (no %PDF- header)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(f"{name}: the PDF is password-protected")
        pages, starts, offset = [], [], 0
        for page in reader.pages:
            text = normalize_text(page.extract_text() or "")
            starts.append(offset)
            pages.append(text)
            offset += len(text) + 2
    except UnreadableDocument:
        raise
    except (
        PyPdfError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
        RecursionError,
        AssertionError,
        ZeroDivisionError,
    ) as exc:
        raise UnreadableDocument(f"{name}: the PDF could not be read ({type(exc).__name__}: {exc})"[:300]) from None
    if not pages:
        raise UnreadableDocument(f"{name}: the PDF has no pages")
    return "\n\n".join(pages), starts


def extract(filename: str | None, data: bytes, max_bytes: int) -> Extracted:
    """Check an upload and extract its text; raises a 4xx SwitchboardError when it cannot be indexed."""
    name = clean_name(filename)
    if not name:
        raise BadRequest("the upload has no file name")
    kind = kind_of(name)
    if len(data) > max_bytes:
        raise DocumentTooLarge(f"{name} is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB")
    if not data.strip():
        raise EmptyDocument(f"{name} is empty")
    page_starts: list[int] = []
    if kind == "pdf":
        text, page_starts = pdf_to_text(data, name)
    elif kind == "html":
        text = html_to_text(decode_text(data, name))
    else:
        text = decode_text(data, name)
    if kind != "pdf":
        text = normalize_text(text)
    if not text.strip():
        why = "no text could be extracted (a scanned PDF needs OCR first)" if kind == "pdf" else "it has no text"
        raise EmptyDocument(f"{name}: {why}")
    return Extracted(name, kind, data, hashlib.sha256(data).hexdigest(), text, page_starts)
