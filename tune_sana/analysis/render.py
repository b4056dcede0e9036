"""The report's sections as text (aligned columns) or as one self-contained HTML page.

Cells: null prints as ``-``; ``max_grad_norm`` inf (clipping off) as ``none``; an lr decade
``d`` as ``1e{d}..1e{d+1}``; lr in scientific notation; ``improvement`` and ``worse`` (damaged
at load) as percentages; other floats with 4 significant digits (the frontier's stable_lr /
diverged_lr as lr). A note prints one line per line of text, in parentheses; a section's
``text`` (sentences) prints as it is, one paragraph per line, under the table.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from tune_sana.analysis.samples import ABOUT, Gallery
from tune_sana.analysis.tables import Section

LR_COLUMNS = ("lr", "stable_lr", "diverged_lr")


def _formatter(name: str) -> Callable[[Any], str]:
    base = name.split(":", 1)[-1]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if base == "lr_decade":
            return f"1e{value}..1e{value + 1}"
        if base == "max_grad_norm" and value == math.inf:
            return "none"
        if base in LR_COLUMNS:
            return f"{value:.2e}"
        if base in ("improvement", "worse"):
            return f"{100 * value:.1f}%"
        if base in ("wall_time_s", "median_step"):
            return f"{value:.1f}" if base == "wall_time_s" else f"{value:g}"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)
    return fmt


def cells(table: pa.Table) -> list[list[str]]:
    """Every cell as display text, column by column (one to_pylist per column)."""
    return [[_formatter(name)(v) for v in table.column(name).to_pylist()]
            for name in table.column_names]


def _headers(section: Section) -> list[str]:
    if section.headers:
        return section.headers
    return [n.split(":", 1)[-1] for n in section.table.column_names]


def _numeric(table: pa.Table) -> list[bool]:
    return [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]


def _join_line(values: Sequence[str], widths: Sequence[int], numeric: Sequence[bool],
               spans: Sequence[int], align_numbers: bool = True) -> str:
    """One text row: numbers right-aligned; ``spans`` (key columns, then one per run) are
    separated by ' | '."""
    out = [v.rjust(w) if align_numbers and n else v.ljust(w)
           for v, w, n in zip(values, widths, numeric, strict=True)]
    chunks, start = [], 0
    for n in spans:
        chunks.append("  ".join(out[start:start + n]))
        start += n
    return " | ".join(chunks).rstrip()


def _text_block(section: Section) -> str:
    cols = cells(section.table)
    heads = _headers(section)
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(heads, cols, strict=True)]
    numeric = _numeric(section.table)
    nkeys = len(heads) - sum(n for _, n in section.groups)
    spans = [nkeys, *(n for _, n in section.groups)] if section.groups else [len(heads)]
    lines = [section.title, "=" * len(section.title)]
    if section.groups:
        labels, start = ["  ".join(" " * w for w in widths[:nkeys])], nkeys
        for label, n in section.groups:
            span = sum(widths[start:start + n]) + 2 * (n - 1)
            labels.append(f"{label[:span]:<{span}}")
            start += n
        lines.append(" | ".join(labels).rstrip())
    lines.append(_join_line(heads, widths, numeric, spans))
    lines.append(_join_line(["-" * w for w in widths], widths, numeric, spans, False))
    if section.table.num_rows == 0:
        lines.append("(none)")
    for r in range(section.table.num_rows):
        lines.append(_join_line([col[r] for col in cols], widths, numeric, spans))
    lines += [f"({line})" for line in section.note.splitlines()]
    lines += section.text.splitlines()
    return "\n".join(lines)


def render_text(sections: Sequence[Section]) -> str:
    """Plain-text tables (numbers right-aligned), one block per section."""
    return "\n\n".join(_text_block(s) for s in sections) + "\n"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _gallery_html(galleries: Sequence[Gallery]) -> list[str]:
    """The sample grids: per run, the base's grid, then each top trial's curve and grid."""
    if not galleries:
        return []
    parts = ["<h2>Samples: what each top trial learned</h2>",
             f"<p class=note>{html.escape(ABOUT)}</p>"]
    for found in galleries:
        parts.append(f"<h3>{html.escape(found.label)}</h3><table class=samples>"
                     "<tr><th>trial</th><th>validation loss</th><th>samples</th></tr>")
        if found.base is not None:
            parts.append("<tr><td>base (before fine-tuning)</td><td></td><td><img class=grid "
                         f"alt='base samples' src='{_data_uri(found.base)}'></td></tr>")
        for row in found.rows:
            curve = (f"<img class=curve alt='{html.escape(row.trial_id)} curve' "
                     f"src='{_data_uri(row.curve)}'>" if row.curve is not None else "")
            parts.append(f"<tr><td>{html.escape(row.caption)}</td><td>{curve}</td><td>"
                         f"<img class=grid alt='{html.escape(row.trial_id)} samples' "
                         f"src='{_data_uri(row.grid)}'></td></tr>")
        parts.append("</table>")
    return parts


def render_html(sections: Sequence[Section], images: Mapping[str, bytes],
                title: str = "tune-sana report", galleries: Sequence[Gallery] = ()) -> str:
    """One self-contained page: every table, the sample grids (each top trial's beside its
    curve, the base's first), then every chart; every PNG inlined as a data: URI."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;margin:2em}"
             "table{border-collapse:collapse;margin-bottom:.5em}"
             "td,th{border:1px solid #ccc;padding:2px 8px}td.n{text-align:right}"
             "p.note{color:#555;font-size:90%}img{max-width:100%}"
             "img.grid{height:136px;max-width:none;image-rendering:pixelated}"
             "table.samples td{vertical-align:middle}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><table>")
        if section.groups:
            nkeys = len(_headers(section)) - sum(n for _, n in section.groups)
            parts.append("<tr>" + (f"<th colspan={nkeys}></th>" if nkeys else "")
                         + "".join(f"<th colspan={n}>{html.escape(label)}</th>"
                                   for label, n in section.groups) + "</tr>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in _headers(section))
                     + "</tr>")
        numeric = _numeric(section.table)
        cols = cells(section.table)
        for r in range(section.table.num_rows):
            parts.append("<tr>" + "".join(
                f"<td{' class=n' if numeric[i] else ''}>{html.escape(col[r])}</td>"
                for i, col in enumerate(cols)) + "</tr>")
        parts.append("</table>")
        parts += [f"<p class=note>{html.escape(line)}</p>" for line in section.note.splitlines()]
        parts += [f"<p>{html.escape(line)}</p>" for line in section.text.splitlines()]
    parts += _gallery_html(galleries)
    for name, png in images.items():
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' "
                     f"src='{_data_uri(png)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
