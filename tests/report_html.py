"""Readers of a rendered report for the tests: HTML tables by id, Markdown tables in order, image sources."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
from matplotlib.image import imread


class _Tables(HTMLParser):
    """Collects every ``<table id=…>`` as rows of cell texts (header row first), and every ``<img>``'s attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.section_ids: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag in ("section", "article") and "id" in a:
            self.section_ids.append(a["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_html(text: str) -> _Tables:
    """The tables, images and section/article ids of an HTML report."""
    parser = _Tables()
    parser.feed(text)
    return parser


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown document, in order, as rows of cells (header first, separator dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("| "):
            if not re.fullmatch(r"\|( --- \|)+", line):
                cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
                current.append([c.strip().replace("\\|", "|") for c in cells])
        elif current:
            tables.append(current)
            current = []
    return tables


def decode_png(src: str) -> np.ndarray:
    """The pixels of a ``data:image/png;base64,…`` source (H × W × 4 floats)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return np.asarray(imread(io.BytesIO(base64.b64decode(src[len(prefix) :])), format="png"))


def number(cell: str) -> float:
    """A score (``+1.2345``) or a share (``12.34 %``, as a fraction) of a report cell."""
    cell = cell.strip()
    return float(cell[:-1].strip()) / 100 if cell.endswith("%") else float(cell)
