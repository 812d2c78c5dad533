"""One table, four formats (Markdown, CSV, booktabs LaTeX, HTML), and the one writer of every table file.

Hand-written: each format is a few lines, and no dependency renders booktabs and escaped Markdown alike."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from outlier_study.output.files import write_csv, write_text


def cell_text(value: object) -> str:
    """A cell as CSV would write it (None is empty), so a table's text and its CSV agree."""
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Table:
    """A paper-layout table: every cell is already the text to show (CSV keeps it verbatim)."""

    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def of(
        cls, name: str, header: Sequence[object], rows: Sequence[Sequence[object]], caption: str = ""
    ) -> Table:
        """A table from values of any type (numbers keep their exact text)."""
        head = tuple(cell_text(h) for h in header)
        return cls(name, head, rectangular(head, [[cell_text(c) for c in row] for row in rows]), caption)


def is_number(text: str) -> bool:
    """Numeric cells are right-aligned; 'nan'/'inf' count, so a column of numbers stays one column."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def numeric_columns(table: Table) -> list[bool]:
    """A column is numeric when it has a value and every non-empty cell parses as a float."""
    out = []
    for i in range(len(table.header)):
        cells = [row[i] for row in table.rows if i < len(row) and row[i] != ""]
        out.append(bool(cells) and all(is_number(c) for c in cells))
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def markdown_escape(text: str) -> str:
    """A cell must stay in its column: escape the pipe, fold newlines."""
    return _one_line(text).replace("|", "\\|")


def to_markdown(table: Table) -> str:
    lines = [
        "| " + " | ".join(markdown_escape(h) for h in table.header) + " |",
        "|" + "---|" * len(table.header),
    ]
    lines += ["| " + " | ".join(markdown_escape(c) for c in row) + " |" for row in table.rows]
    body = "\n".join(lines) + "\n"
    parts = [f"**{markdown_escape(table.caption)}**\n\n"] if table.caption else []
    parts.append(body)
    parts += [f"\n_{markdown_escape(note)}_\n" for note in table.notes]
    return "".join(parts)


# Text-mode LaTeX for the characters tables here contain; anything else non-ASCII passes through as UTF-8.
_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "×": r"$\times$",
    "±": r"$\pm$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "−": r"$-$",
    "·": r"$\cdot$",
    "⊙": r"$\odot$",
    "…": r"\dots{}",
    "—": "---",
    "–": "--",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "μ": r"$\mu$",
    "σ": r"$\sigma$",
}


def latex_escape(text: str) -> str:
    """Escape one cell for a LaTeX tabular (text mode)."""
    return "".join(_LATEX.get(ch, ch) for ch in _one_line(text))


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); numeric columns right-aligned."""
    spec = "".join("r" if num else "l" for num in numeric_columns(table))
    lines = [f"% {_one_line(table.caption or table.name)}"]
    lines += [f"% {_one_line(note)}" for note in table.notes]
    lines += [
        "% requires \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in table.header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table, anchor: str | None = None) -> str:
    """An HTML table (escaped) with numeric columns marked for right alignment."""
    num = numeric_columns(table)
    parts = [f'<table id="{html.escape(anchor)}">' if anchor else "<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append(
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr></thead>"
    )
    parts.append("<tbody>")
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if num[i] else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in table.notes]
    return "\n".join(parts)


def format_value(value: object, digits: int | None = None) -> str:
    """A metric as table text: fixed digits when asked (paper tables), else exact (CSV round-trips)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and digits is not None and math.isfinite(value):
        return f"{value:.{digits}f}"
    return str(value)


def write_table(out_dir: Path, table: Table, formats: Sequence[str] = ("md", "csv")) -> str:
    """<name>.<format> for each format (md, csv, tex), each written atomically; returns the Markdown.
    A job writes md and csv; a collected sweep adds tex."""
    markdown = to_markdown(table)
    writers = {
        "md": lambda p: write_text(p, markdown),
        "csv": lambda p: write_csv(p, table.header, table.rows),
        "tex": lambda p: write_text(p, to_latex(table)),
    }
    for ext in formats:
        writers[ext](out_dir / f"{table.name}.{ext}")
    return markdown


def rectangular(header: Sequence[str], rows: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """Pad or cut rows to the header's width, so every format has the same grid."""
    width = len(header)
    return tuple(tuple([*row[:width], *[""] * (width - len(row))]) for row in rows)
