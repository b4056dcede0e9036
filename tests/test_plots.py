"""tune-sana report --plots: PNGs exist, are PNGs, and plot what history says."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_sana.analysis.plots import (
    FACET_ABOVE,
    causes_chart,
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
    expected = {t.trial_id: val_curve(t)[-1] for t in diverged}
    assert {r["trial_id"]: (r["last_step"], r["last_val"]) for r in last.to_pylist()} == expected
    points = {r["trial_id"]: r for r in stability_points(run).to_pylist()}
    assert "t10" not in points  # error: not drawn
    assert points["t02"]["y"] == expected["t02"][1]
    assert points["t01"]["y"] == 0.20 and points["t04"]["outcome"] == "pruned"


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
