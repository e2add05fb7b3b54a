"""Writers: Markdown and self-contained HTML from one list of blocks; CSV and Parquet of the frame."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.errors import UsageError
from harness.report.frame import export_frame
from harness.report.printers import markdown
from harness.report.tables import Table

FORMATS = ("md", "html", "csv", "parquet")


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str


Block = Heading | Text | Bullets | Table | Image


def check_formats(formats: tuple[str, ...]) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(
            f"unknown report format '{','.join(unknown)}': use --format with a comma list of {','.join(FORMATS)}"
        )


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown; images are linked by file name next to report.md."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append((f"**{block.title}**\n\n" if block.title else "") + markdown(block.headers, block.rows))
        elif isinstance(block, Image):
            parts.append(f"![{block.alt}]({block.path.name})")
    return "\n\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.title)}</caption>" if table.title else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(image: Image) -> str:
    data = base64.b64encode(image.path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(image.alt)}" src="data:image/png;base64,{data}"></figure>'


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}caption{text-align:left;font-weight:bold}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%}"""


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: tables inline, plots embedded as base64 PNG."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Image):
            parts.append(_html_image(block))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    """CSV or Parquet (by suffix) of the tidy frame, list and dict columns as JSON strings."""
    out = export_frame(frame)
    if path.suffix == ".csv":
        out.to_csv(path, index=False)
    else:
        out.to_parquet(path, index=False)
    return path


def write_document(blocks: list[Block], out: Path, formats: tuple[str, ...], title: str) -> list[Path]:
    """report.md and/or report.html in `out`."""
    written = []
    if "md" in formats:
        written.append(out / "report.md")
        written[-1].write_text(to_markdown(blocks), encoding="utf-8")
    if "html" in formats:
        written.append(out / "report.html")
        written[-1].write_text(to_html(blocks, title), encoding="utf-8")
    return written
