"""tune-sana report --plots: PNGs exist, are PNGs, and plot what history says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from tune_sana.analysis.plots import (
    FACET_ABOVE,
    causes_chart,
    curves,
    last_finite_val,
    stability_map,
    stability_points,
)
from tune_sana.analysis.report import report
from tune_sana.analysis.runs import load_run
from tune_sana.testing.sweeps import (
    PRECISIONS,
    SECOND,
    SMALL,
    large_sweep,
    val_curve,
    write_large_parquet,
    write_small_sweep,
    write_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["stability_map.png", "curves.png", "causes.png"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sweep(tmp_path_factory.mktemp("plots") / "run", with_running=True)


def test_diverged_trials_sit_at_their_last_finite_val(sweep: Path) -> None:
    run = load_run(sweep)
    diverged = [t for t in SMALL if t.outcome == "diverged"]
    last = last_finite_val(run, [t.trial_id for t in diverged])
    expected = {t.trial_id: val_curve(t)[-1] for t in diverged if val_curve(t)}
    assert {r["trial_id"]: (r["last_step"], r["last_val"]) for r in last.to_pylist()} == expected
    points = {r["trial_id"]: r for r in stability_points(run).to_pylist()}
    assert "t10" not in points  # error: not drawn
    assert points["t02"]["y"] == expected["t02"][1]
    # t08 diverged at update 10, before any validation after the base's: the top edge
    assert "t08" not in expected and points["t08"]["y"] is None
    assert points["t01"]["y"] == 0.20 and points["t04"]["outcome"] == "pruned"


def _base_lines(fig: Figure) -> dict[str, set[float]]:
    """label -> y values of the horizontal base lines on every panel of ``fig``."""
    out: dict[str, set[float]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("base"):
                out.setdefault(label, set()).add(float(np.asarray(line.get_ydata())[0]))
    return out


def test_the_base_is_a_line_and_curves_start_at_it(sweep: Path, tmp_path: Path) -> None:
    run = load_run(sweep)
    assert _base_lines(stability_map([run])) == {"base": {1.0}}
    fig = curves([run])
    assert _base_lines(fig) == {"base": {1.0}}
    left = fig.axes[0]
    drawn = {str(line.get_label()).split()[0]: line for line in left.get_lines()
             if not str(line.get_label()).startswith("base")}
    assert drawn.keys() >= {"t01", "t06", "t12"}
    for line in drawn.values():  # every curve starts at step 0, the untouched base
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert (x[0], y[0]) == (0, 1.0)
    # bases that differ by precision: one line per precision mode
    varied = [replace(t, base=1.2 if t.precision == "fp16-amp" else 1.0)
              for t in SMALL if t.precision in ("fp32", "fp16-amp")]
    other = load_run(write_sweep(tmp_path / "varied", varied))
    assert _base_lines(stability_map([other])) == {"base fp32": {1.0}, "base fp16-amp": {1.2}}


def test_plots_are_written_as_pngs(sweep: Path, tmp_path: Path) -> None:
    text = report([sweep], plots_dir=tmp_path / "plots")
    for name in NAMES:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert name in text


def test_plots_of_two_runs_and_of_a_run_without_divergence(sweep: Path, tmp_path: Path) -> None:
    calm = write_sweep(tmp_path / "calm", [t for t in SMALL + SECOND
                                           if t.outcome in ("completed", "pruned")])
    report([sweep, calm], plots_dir=tmp_path / "two")
    for name in NAMES:
        assert (tmp_path / "two" / name).read_bytes().startswith(PNG_MAGIC)
    chart = causes_chart([load_run(calm)])
    assert "no trial diverged" in [t.get_text() for ax in chart.axes for t in ax.texts]


def test_a_big_sweep_gets_one_panel_per_precision(tmp_path: Path) -> None:
    sweep = large_sweep(n_trials=FACET_ABOVE + 20, n_steps=30, eval_every=5)
    run_dir = tmp_path / "big"
    write_large_parquet(run_dir, sweep, flush_rows=1000)
    fig = stability_map([load_run(run_dir)])
    assert len(fig.axes) == len(PRECISIONS)
    assert {ax.get_title().split("\n")[0] for ax in fig.axes} == {f"big: {p}"
                                                                   for p in PRECISIONS}
