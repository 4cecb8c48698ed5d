"""A self-contained HTML report: sections of text, tables, preformatted blocks and PNGs."""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from circuitscan.schemas.errors import UserInputError

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
ul.tree { font-family: monospace; font-size: 0.85em; }
"""


class ReportError(UserInputError):
    """A report that cannot be written as asked (e.g. a figure file that does not exist)."""


@dataclass(frozen=True)
class Table:
    """Rows of cells under column headers; floats are shown with ``digits`` decimals."""

    columns: list[str]
    rows: list[list[object]]
    caption: str = ""
    digits: int = 3


@dataclass(frozen=True)
class Figure:
    """A PNG/SVG file on disk, copied next to index.html."""

    path: Path
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """One titled part of a report."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    preformatted: list[str] = field(default_factory=list)
    raw_html: list[str] = field(default_factory=list)


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return f"<td>{value:.{digits}f}</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    return f'<td class="text">{html.escape("" if value is None else str(value))}</td>'


def table_html(table: Table) -> str:
    """One table as HTML."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(_cell(v, table.digits) for v in row) + "</tr>" for row in table.rows
    )
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<tr>{head}</tr>{body}</table>"


def write_report(out_dir: Path | str, sections: list[Section], title: str = "Report") -> Path:
    """Write ``out_dir/index.html`` (figures copied beside it) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        parts += [table_html(t) for t in section.tables]
        for fig in section.figures:
            source = Path(fig.path)
            if not source.is_file():
                raise ReportError(f"figure {source} does not exist")
            target = out / source.name
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
            caption = html.escape(fig.caption)
            parts.append(
                f"<figure><img src='{html.escape(source.name)}' alt='{caption}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts += [f"<pre>{html.escape(p)}</pre>" for p in section.preformatted]
        parts += section.raw_html
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
