"""tune-sana report on synthetic sweeps with answers worked out by hand (tests/synthetic.py)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_sana.analysis.render import render_text
from tune_sana.analysis.report import report
from tune_sana.analysis.runs import load_run, load_runs
from tune_sana.analysis.tables import (
    base_losses,
    build_sections,
    confirmed_configs,
    divergence_causes,
    ranking,
    side_by_side,
    stability,
    varying_columns,
)
from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.testing.sweeps import (
    SECOND,
    SMALL,
    write_confirmed_sweep,
    write_small_sweep,
    write_sweep,
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sweep(tmp_path_factory.mktemp("small") / "fp16-ckpt", with_running=True)


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("second") / "bf16-ckpt", SECOND)


def rows(table: pa.Table) -> list[tuple[object, ...]]:
    return [tuple(r.values()) for r in table.to_pylist()]


def test_stability_by_precision_variant_and_lr_decade(sweep: Path) -> None:
    table = stability(load_run(sweep), ["precision", "variant", "lr_decade"])
    assert table.column_names == ["precision", "variant", "lr_decade", "trials", "diverged",
                                  "collapsed", "pruned", "completed", "error", "best_val"]
    assert rows(table) == [
        ("fp32", "bf16", -5, 1, 0, 0, 0, 1, 0, 0.30),
        ("fp32", "bf16", -4, 1, 0, 0, 0, 1, 0, 0.20),
        ("fp32", "fp16", -3, 1, 1, 0, 0, 0, 0, None),
        ("fp16-amp", "bf16", -5, 1, 0, 0, 0, 0, 1, None),
        ("fp16-amp", "fp16", -4, 1, 0, 0, 0, 1, 0, 0.22),
        ("fp16-amp", "fp16", -3, 1, 1, 0, 0, 0, 0, None),
        ("bf16-amp", "bf16", -4, 2, 0, 0, 1, 1, 0, 0.25),
        ("bf16-amp", "bf16", -2, 1, 1, 0, 0, 0, 0, None),
        ("bf16-amp", "fp16", -4, 1, 0, 0, 1, 0, 0, 0.40),
        ("fp16", "fp16", -5, 1, 1, 0, 0, 0, 0, None),
        ("fp16", "fp16", -4, 1, 1, 0, 0, 0, 0, None),
    ]


def test_stability_by_warmup_and_by_clip(sweep: Path) -> None:
    run = load_run(sweep)
    assert rows(stability(run, ["warmup_steps"])) == [
        (0, 7, 4, 0, 1, 1, 1, 0.30), (20, 5, 1, 0, 1, 3, 0, 0.20)]
    # clipping off (null) is the clip value inf, printed as 'none'
    assert rows(stability(run, ["max_grad_norm"])) == [
        (1.0, 4, 1, 0, 1, 2, 0, 0.20), (math.inf, 8, 4, 0, 1, 2, 1, 0.25)]


def test_divergence_causes_counts_and_median_steps(sweep: Path) -> None:
    by_cause, by_module, median = divergence_causes(load_run(sweep))
    assert rows(by_cause) == [("nonfinite_grad", 2, 30.0), ("loss_spike", 1, 60.0),
                              ("nonfinite_loss", 1, 30.0), ("nonfinite_params", 1, 10.0)]
    assert rows(by_module) == [("(not located)", 2, 35.0),
                               ("transformer_blocks.0.attn1", 2, 25.0),
                               ("transformer_blocks.1.ff", 1, 40.0)]
    assert median == 30.0


def test_ranking_leaves_out_diverged_and_keeps_running(sweep: Path) -> None:
    run = load_run(sweep)
    columns = varying_columns([run])
    assert columns == ["precision", "variant", "lr", "warmup_steps", "max_grad_norm"]
    table = ranking([run], columns, top=5)
    assert table["trial_id"].to_pylist() == ["t01", "t06", "t03", "t12", "t00"]
    assert table["outcome"].to_pylist() == ["completed", "completed", "completed", "running",
                                            "completed"]
    assert table["best_val_loss"].to_pylist()[:3] == [0.20, 0.22, 0.25]


def test_fixed_settings_come_from_the_spec(sweep: Path) -> None:
    # the engine records searched keys only; sweep.yaml's fixed block and defaults fill the rest
    trials = load_run(sweep).trials
    assert set(trials["steps"].to_pylist()) == {100}
    assert set(trials["model"].to_pylist()) == {"demo-base"}
    assert set(trials["seed"].to_pylist()) == {0}
    assert None in trials["max_grad_norm"].to_pylist()  # searched null stays null


def test_running_sweep_without_trials_parquet(tmp_path: Path) -> None:
    run_dir = write_sweep(tmp_path / "live", SMALL[:3], finish=False)
    assert not (run_dir / "trials.parquet").exists()
    run = load_run(run_dir)
    assert run.trials.num_rows == 0
    assert sorted(run.running["trial_id"].to_pylist()) == ["t00", "t01", "t02"]
    assert run.running.filter(pa.compute.equal(run.running["trial_id"], "t01"))[
        "best_val_loss"].to_pylist() == [0.20]
    text = report([run_dir])
    assert "running" in text and "3 running trial(s) not counted yet" in text


def test_several_run_dirs_side_by_side(sweep: Path, second: Path) -> None:
    runs = load_runs([sweep, second])
    tables = [stability(r, ["precision", "variant", "lr_decade"]) for r in runs]
    table, groups = side_by_side(runs, tables, ["precision", "variant", "lr_decade"])
    assert groups == [("fp16-ckpt", 7), ("bf16-ckpt", 7)]
    cell = table.filter(pa.compute.and_(pa.compute.equal(table["precision"], "fp32"),
                                        pa.compute.equal(table["lr_decade"], -4)))
    assert rows(cell) == [("fp32", "bf16", -4, 1, 0, 0, 0, 1, 0, 0.20, 1, 0, 0, 0, 1, 0, 0.18)]
    only_second = table.filter(pa.compute.equal(table["precision"], "fp16"))
    assert ("fp16", "bf16", -4, None, None, None, None, None, None, None, 1, 1, 0, 0, 0, 0,
            None) in rows(only_second)
    text = render_text(build_sections(runs))
    assert "fp16-ckpt" in text and "bf16-ckpt" in text
    ranked = ranking(runs, varying_columns(runs), top=2)
    assert rows(ranked.select(["run", "trial_id"])) == [("bf16-ckpt", "u00"),
                                                        ("fp16-ckpt", "t01")]


def test_cli_report_and_html(sweep: Path, second: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "report.html"
    assert main(["report", str(sweep), str(second), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    for title in ("Top 10 trials", "Stability by precision x checkpoint variant",
                  "Stability by warmup_steps", "Stability by max_grad_norm",
                  "Divergence causes", "First non-finite module"):
        assert title in out
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html


def test_bad_run_dir_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="not a tune-sana run directory"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a tune-sana run directory" in capsys.readouterr().err


def test_report_imports_no_ray(sweep: Path) -> None:
    code = ("import sys; import tune_sana.analysis.best, tune_sana.analysis.plots; "
            "from tune_sana.analysis.report import report; report([sys.argv[1]]); "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray'")
    subprocess.run([sys.executable, "-c", code, str(sweep)], check=True)


def test_trials_file_of_an_older_schema_still_reads(tmp_path: Path) -> None:
    # a column added to TrialConfig (or the summary) after the file was written reads as null
    run_dir = write_small_sweep(tmp_path / "old")
    path = run_dir / "trials.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["seed", "nonfinite_module"]), path)
    run = load_run(run_dir)
    assert set(run.trials["seed"].to_pylist()) == {0}  # TrialConfig's default
    _, by_module, _ = divergence_causes(run)
    assert rows(by_module) == [("(not located)", 5, 30.0)]


# --- the base, improvement and the confirm stage ----------------------------------------------

V2_COLUMNS = ["base_val_loss", "improvement", "base_retain_loss", "final_retain_loss", "stage",
              "config_id"]


@pytest.fixture(scope="module")
def confirmed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_confirmed_sweep(tmp_path_factory.mktemp("confirmed") / "confirmed")


def _section(text: str, title: str) -> list[str]:
    """The lines of the text section starting with ``title`` (up to the blank line)."""
    start = text.index(title)
    return text[start:].split("\n\n", 1)[0].splitlines()


def test_base_printed_once_and_improvement_per_trial(sweep: Path) -> None:
    run = load_run(sweep)
    ranked = ranking([run], varying_columns([run]), top=4)
    assert ranked["improvement"].to_pylist() == pytest.approx([0.80, 0.78, 0.75, 0.72])
    assert ranked["trial_id"][3].as_py() == "t12"  # running: base and best from its history
    live = run.running.to_pylist()[0]
    assert (live["base_val_loss"], live["steps_run"]) == (1.0, 50)
    assert live["best_val_loss"] == pytest.approx(0.28)
    text = report([sweep])
    overview = _section(text, "Runs")
    assert any(line.split() == ["base", "val", "loss", "1"] for line in overview)
    assert any(line.split() == ["improvement", "80.0%"] for line in overview)
    assert "Base (the untouched model" not in text  # one base: printed once
    top = _section(text, "Top 7 trials")
    assert "80.0%" in top[4] and top[4].startswith("t01")
    assert top[-1] == ("(single seed per trial: the ranking's noise is unknown; add 'search: "
                       "{confirm: {top_k: 3, seeds: 2}}' to the space to re-run the top "
                       "configurations with fresh seeds)")
    assert "Confirmed configurations" not in text


def test_a_base_that_differs_is_printed_per_precision_and_variant(tmp_path: Path) -> None:
    trials = [replace(t, base=1.25 if t.variant == "fp16" else 1.0) for t in SMALL]
    run = load_run(write_sweep(tmp_path / "run", trials))
    assert rows(base_losses(run).select(["precision", "variant", "trials", "base_val"])) == [
        ("fp32", "bf16", 2, 1.0), ("fp32", "fp16", 1, 1.25), ("fp16-amp", "bf16", 1, 1.0),
        ("fp16-amp", "fp16", 2, 1.25), ("bf16-amp", "bf16", 3, 1.0),
        ("bf16-amp", "fp16", 1, 1.25), ("fp16", "fp16", 2, 1.25)]
    text = render_text(build_sections([run]))
    assert _section(text, "Runs")[11].split() == ["base", "val", "loss", "varies", "(see",
                                                  "Base)"]
    assert "Base (the untouched model at step 0) by precision x checkpoint variant" in text


def test_confirmed_configurations_with_mean_se_and_marks(confirmed_run: Path) -> None:
    run = load_run(confirmed_run)
    table = confirmed_configs([run], ["precision", "lr"])
    assert table.column_names == ["config_id", "precision", "lr", "seeds", "diverged",
                                  "mean_val", "se", "improvement", "search_val", "vs_best",
                                  "vs_base"]
    got = rows(table)
    assert [r[0] for r in got] == ["t03", "t01", "t06"]
    assert got[1][:5] == ("t01", "fp32", 3e-4, 2, 0) and got[1][8:] == (0.20, "best", "better")
    assert got[1][5:7] == pytest.approx((0.21, 0.002))
    assert got[0][3:5] == (2, 1) and got[0][6] is None and got[0][9:] == ("~best", "~base")
    assert got[2][9:] == ("worse", "better")
    text = report([confirmed_run])
    section = _section(text, "Confirmed configurations (fresh seeds)")
    assert section[2].split() == ["config_id", "precision", "variant", "lr", "warmup_steps",
                                  "max_grad_norm", "seeds", "diverged", "mean_val", "se",
                                  "improvement", "search_val", "vs_best", "vs_base"]
    assert section[5].split() == ["t01", "fp32", "bf16", "3.00e-04", "20", "1", "2", "0",
                                  "0.21", "0.002", "79.0%", "0.2", "best", "better"]
    assert "not distinguishable from it" in section[-1]
    assert "single seed per trial" not in text
    assert "t01: 0.21 +- 0.002 (2 seeds)" in _section(text, "Runs")[-1]
    top = _section(text, "Top 10 trials")
    assert top[2].split()[:4] == ["trial_id", "stage", "config_id", "precision"]


def test_a_run_of_schema_version_1_still_reports(confirmed_run: Path, tmp_path: Path) -> None:
    # before the base and the confirm stage: no base, improvement, stage or config_id columns
    old = tmp_path / "v1"
    shutil.copytree(confirmed_run, old)
    path = old / "trials.parquet"
    pq.write_table(pq.read_table(path).drop_columns(V2_COLUMNS), path)
    run = load_run(old)
    assert set(run.trials["stage"].to_pylist()) == {"search"}
    text = report([old])
    assert "(single seed per trial: the ranking's noise is unknown;" in text
    assert "Confirmed configurations" not in text
    overview = _section(text, "Runs")
    assert any(line.split() == ["base", "val", "loss", "-"] for line in overview)
    assert "no confirm stage" in overview[-1]
    top = _section(text, "Top 10 trials")
    column = top[2].split().index("improvement")
    assert top[4].split()[0] == "t01" and top[4].split()[column] == "-"  # not recorded
