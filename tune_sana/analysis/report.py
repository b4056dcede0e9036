"""``tune-sana report``: one or more run dirs read (``runs``), tabulated (``tables``) and
rendered as text, optionally also as PNG charts (``plots``) and one HTML page (``render``).

Reads the Parquet record only; nothing here imports Ray or torch, and matplotlib is imported
only when charts are asked for. How null config values are filled and printed: see
:func:`tune_sana.analysis.runs.effective_configs` and :mod:`tune_sana.analysis.render`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tune_sana.analysis.render import render_html, render_text
from tune_sana.analysis.runs import load_runs
from tune_sana.analysis.tables import build_sections
from tune_sana.config import UserError


def report(run_dirs: Sequence[str | os.PathLike[str]], top: int = 10,
           plots_dir: str | os.PathLike[str] | None = None,
           html_file: str | os.PathLike[str] | None = None) -> str:
    """The text report of one or more run dirs; writes PNGs to ``plots_dir`` and one HTML page
    to ``html_file`` when given. matplotlib is imported only then."""
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    runs = load_runs(run_dirs)
    sections = build_sections(runs, top)
    text = render_text(sections)
    if plots_dir is None and html_file is None:
        return text
    from tune_sana.analysis import plots  # imports matplotlib: only when charts are asked for

    images = plots.render_pngs(runs, top=min(top, 8))
    if plots_dir is not None:
        written = plots.save_pngs(images, Path(plots_dir))
        text += "\nplots: " + ", ".join(str(p) for p in written) + "\n"
    if html_file is not None:
        page = render_html(sections, images,
                           "tune-sana report: " + ", ".join(r.label for r in runs),
                           galleries=plots.galleries(runs, top=min(top, 8)))
        target = Path(html_file)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(page)
        except OSError as err:
            raise UserError(f"--html {html_file}: cannot write ({err.strerror})") from None
        text += f"html: {target}\n"
    return text
