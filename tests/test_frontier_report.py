"""The stability frontier in the report (table, sentences, HTML), on the stability map, and as
the lr limit of `tune-sana best --frontier RUN --margin X`, on run folders written by hand (no
Ray): trials through the real ResultsWriter, frontier.parquet with FRONTIER_SCHEMA."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

from tune_sana.analysis import plots
from tune_sana.analysis.best import best, best_config
from tune_sana.analysis.frontier import (
    fmt_lr,
    fmt_lrs,
    frontier_table,
    sentences,
    within_margin,
)
from tune_sana.analysis.plots import COLOURS, stability_map
from tune_sana.analysis.render import render_text
from tune_sana.analysis.report import report
from tune_sana.analysis.runs import load_run
from tune_sana.analysis.tables import build_sections
from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.record.atomic import write_atomic
from tune_sana.record.schema import FRONTIER_FILE, FRONTIER_SCHEMA, file_metadata
from tune_sana.testing.sweeps import (
    FIXED,
    Synth,
    write_confirmed_sweep,
    write_small_sweep,
    write_sweep,
)

LOW, HIGH = 1.0e-5, 1.0e-1
SPACE = {"lr": {"loguniform": [LOW, HIGH]},
         "precision": {"choice": ["fp32", "fp16-amp", "bf16-amp", "fp16"]},
         "variant": {"choice": ["fp16", "bf16"]}}
ATTN1 = "transformer_blocks.1.attn1"
ATTN0 = "transformer_blocks.0.attn1"


def row(precision: str, variant: str, verdict: str, stable: float | None,
        diverged: float | None, **more: Any) -> dict[str, Any]:
    """One frontier.parquet row of the combination precision x variant."""
    values = {"precision": precision, "variant": variant}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    out: dict[str, Any] = dict.fromkeys(FRONTIER_SCHEMA.names)
    out.update({
        "combo_id": hashlib.sha256(text.encode()).hexdigest()[:12], "combo_json": text,
        "label": f"precision {precision}, variant {variant}", "lr_key": "lr",
        "verdict": verdict, "lr_low": LOW, "lr_high": HIGH, "stable_lr": stable,
        "diverged_lr": diverged, "ratio": None if stable is None or diverged is None
        else diverged / stable, "tolerance": 1.25, "trials": 6, "trial_steps": 400,
        "probes_json": "[]", "updated_at": 1.0})
    out.update(more)
    return out


def spread(n: int, of: int) -> dict[str, int]:
    return {"diverged_count": n, "diverged_seeds": of}


# Known answers: table order F, E, A, C, D, B, G (stable lr ascending; none first; error last).
ROWS = {
    "A": row("fp32", "bf16", "searching", 1e-4, None, stable_seeds=2, trials=3),
    "B": row("fp32", "fp16", "stable_to_upper", HIGH, None, stable_seeds=2),
    "C": row("fp16-amp", "fp16", "bracketed", 3.1e-4, 3.9e-4, stable_seeds=2, **spread(2, 2),
             divergence_cause="nonfinite_grad", nonfinite_module=ATTN1, diverged_step=12,
             trials=10, trial_steps=820),
    "D": row("fp16-amp", "bf16", "bracketed", 2.4e-2, 2.9e-2, stable_seeds=2, **spread(1, 2),
             divergence_cause="loss_spike", diverged_step=40),
    "E": row("fp16", "fp16", "unstable_at_lower", None, LOW, **spread(2, 2),
             divergence_cause="nonfinite_params", diverged_step=3),
    "F": row("bf16-amp", "fp16", "searching", None, 1e-2, **spread(1, 1),
             divergence_cause="nonfinite_loss", nonfinite_module=ATTN0),
    "G": row("bf16-amp", "bf16", "error", None, None,
             error="RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."),
}
ORDER = ["F", "E", "A", "C", "D", "B", "G"]
SENTENCES = [
    "fp32 on fp16 weights: stable up to the upper bound 1e-1 in 2 of 2 seeds. On bf16 weights: "
    "not settled: the trial budget ran out; bracket so far: stable up to 1e-4, no divergence "
    "seen yet.",
    "fp16-amp on fp16 weights: stable up to 3.1e-4; diverges from 3.9e-4 in "
    "transformer_blocks.1.attn1 (2 of 2 seeds). On bf16 weights: stable up to 2.4e-2; diverges "
    "from 2.9e-2 (loss_spike, 1 of 2 seeds).",
    "bf16-amp on fp16 weights: not settled: the trial budget ran out; bracket so far: no "
    "stable lr found yet, diverges from 1e-2 in transformer_blocks.0.attn1 (1 of 1 seed). On "
    "bf16 weights: no verdict: a probe failed (RuntimeError: CUDA out of memory).",
    "fp16 on fp16 weights: diverges already at the lower bound 1e-5 (nonfinite_params, 2 of 2 "
    "seeds).",
]


def probe(tid: str, precision: str, variant: str, lr: float, seed: int,
          val: float | None) -> Synth:
    """A frontier-stage trial: finite with ``val``, or (val None) diverged at step 20."""
    if val is None:
        return Synth(tid, precision, variant, lr, 0, None, "diverged", steps=20,
                     cause="nonfinite_grad", diverged_step=20, stage="frontier", seed=seed)
    return Synth(tid, precision, variant, lr, 0, None, "completed", val, stage="frontier",
                 seed=seed)


PROBES = [
    probe("f00", "fp16-amp", "fp16", 3.1e-4, 0, 0.30), probe("f01", "fp16-amp", "fp16", 3.1e-4,
                                                             1, 0.31),
    probe("f02", "fp16-amp", "fp16", 3.9e-4, 0, None), probe("f03", "fp16-amp", "fp16", 3.9e-4,
                                                             1, None),
    probe("f04", "fp32", "fp16", HIGH, 0, 0.50), probe("f05", "fp32", "fp16", HIGH, 1, 0.52),
    probe("f06", "fp16", "fp16", LOW, 0, None), probe("f07", "fp16", "fp16", LOW, 1, None),
    probe("f08", "fp16-amp", "bf16", 2.4e-2, 0, 0.40),
    probe("f09", "fp16-amp", "bf16", 2.9e-2, 0, None),
    probe("f10", "fp32", "bf16", 1e-4, 0, 0.25),
]


def write_frontier(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    table = pa.Table.from_pylist(rows, schema=FRONTIER_SCHEMA.with_metadata(file_metadata("")))
    write_atomic(table, run_dir / FRONTIER_FILE)
    return run_dir


def write_frontier_run(run_dir: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    search = {"algorithm": "frontier", "frontier": {"tolerance": 1.25, "seeds": 2}}
    write_sweep(run_dir, PROBES, space=SPACE, search=search)
    return write_frontier(run_dir, list(ROWS.values()) if rows is None else rows)


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_frontier_run(tmp_path_factory.mktemp("frontier") / "frontier")


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sweep(tmp_path_factory.mktemp("search") / "search")


def _section(text: str, title: str) -> list[str]:
    start = text.index(title)
    return text[start:].split("\n\n", 1)[0].splitlines()


# --- the table and the sentences ---------------------------------------------------------------

def test_lrs_print_short_and_apart() -> None:
    assert [fmt_lr(3.1e-4), fmt_lr(1e-1), fmt_lr(2.45e-2, 3)] == ["3.1e-4", "1e-1", "2.45e-2"]
    assert fmt_lrs(1.0e-3, 1.04e-3) == ["1e-3", "1.04e-3"]  # 2 digits would print both 1e-3
    assert fmt_lrs(None, 3.9e-4) == ["-", "3.9e-4"]


def test_table_is_sorted_by_stable_lr(frontier_run: Path) -> None:
    table = frontier_table(pq.read_table(frontier_run / FRONTIER_FILE))
    assert table.column_names == ["setting", "verdict", "stable_lr", "diverged_lr", "ratio",
                                  "stable_seeds", "diverged", "cause", "nonfinite_module",
                                  "trials", "trial_steps"]
    assert table["setting"].to_pylist() == [ROWS[k]["label"] for k in ORDER]
    assert table["verdict"].to_pylist() == ["searching", "unstable_at_lower", "searching",
                                            "bracketed", "bracketed", "stable_to_upper",
                                            "error"]
    assert table["diverged"].to_pylist() == ["1 of 1", "2 of 2", None, "2 of 2", "1 of 2", None,
                                             None]
    c = table.slice(3, 1).to_pylist()[0]
    assert (c["stable_lr"], c["diverged_lr"], c["cause"], c["nonfinite_module"], c["trials"],
            c["trial_steps"]) == (3.1e-4, 3.9e-4, "nonfinite_grad", ATTN1, 10, 820)
    assert c["ratio"] == pytest.approx(3.9 / 3.1)


def test_every_verdict_in_words(frontier_run: Path) -> None:
    table = pq.read_table(frontier_run / FRONTIER_FILE)
    assert sentences(table, SPACE) == SENTENCES
    live = sentences(table, SPACE, live=True)
    assert live[0].endswith("On bf16 weights: not settled yet: the search is still running; "
                            "bracket so far: stable up to 1e-4, no divergence seen yet.")


def test_a_combination_one_key_apart_is_phrased_with_that_key() -> None:
    def attention(flag: bool, stable: float, diverged: float) -> dict[str, Any]:
        text = json.dumps({"attention_fp32": flag, "precision": "fp16-amp"}, sort_keys=True)
        label = f"precision fp16-amp, attention_fp32 {str(flag).lower()}"
        return {**row("fp16-amp", "fp16", "bracketed", stable, diverged, **spread(2, 2),
                      nonfinite_module=ATTN1), "combo_json": text, "label": label}

    table = pa.Table.from_pylist([attention(True, 2.4e-2, 2.9e-2),
                                  attention(False, 3.1e-4, 3.9e-4)], schema=FRONTIER_SCHEMA)
    space = {"lr": {"loguniform": [LOW, HIGH]}, "precision": {"choice": ["fp16-amp"]},
             "attention_fp32": {"choice": [False, True]}}
    assert sentences(table, space) == [
        "fp16-amp, without attention_fp32: stable up to 3.1e-4; diverges from 3.9e-4 in "
        "transformer_blocks.1.attn1 (2 of 2 seeds). With attention_fp32: stable up to 2.4e-2; "
        "diverges from 2.9e-2 in transformer_blocks.1.attn1 (2 of 2 seeds)."]
    # no categorical key at all: one combination, labelled ''
    alone = pa.Table.from_pylist([{**row("fp32", "fp16", "stable_to_upper", HIGH, None,
                                         stable_seeds=2), "combo_json": "{}", "label": ""}],
                                 schema=FRONTIER_SCHEMA)
    assert sentences(alone) == ["All trials: stable up to the upper bound 1e-1 in 2 of 2 seeds."]
    assert frontier_table(alone)["setting"].to_pylist() == ["(all trials)"]


def test_report_prints_the_frontier_table_and_sentences(frontier_run: Path) -> None:
    text = report([frontier_run])
    section = _section(text, "Stability frontier")
    assert section[1] == "=" * len("Stability frontier")
    assert section[2].split()[:3] == ["setting", "verdict", "stable_lr"]
    body = section[4:4 + len(ORDER)]
    for line, key in zip(body, ORDER, strict=True):
        assert line.startswith(ROWS[key]["label"])
    assert body[3].split()[4:] == ["bracketed", "3.10e-04", "3.90e-04", "1.258", "2", "2", "of",
                                   "2", "nonfinite_grad", ATTN1, "10", "820"]
    assert section[-len(SENTENCES):] == SENTENCES
    assert section[4 + len(ORDER)].startswith("(sorted by stable_lr, lowest first;")
    # right after the overview
    assert text.index("Stability frontier") < text.index("Top ")


def test_html_report_has_the_frontier(frontier_run: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    report([frontier_run], html_file=page)
    html = page.read_text()
    assert "<h2>Stability frontier</h2>" in html
    for line in SENTENCES:
        assert f"<p>{line}</p>" in html
    assert html.count("data:image/png;base64,") == 3


def test_a_run_without_frontier_reports_as_before(frontier_run: Path, search_run: Path,
                                                  tmp_path: Path) -> None:
    plain = tmp_path / "frontier"  # the same trials, without frontier.parquet
    shutil.copytree(frontier_run, plain)
    (plain / FRONTIER_FILE).unlink()
    without, with_ = report([plain]), report([frontier_run])
    assert "Stability frontier" not in without
    block = "\n".join(_section(with_, "Stability frontier")) + "\n\n"
    assert with_.replace(block, "") == without
    assert "Stability frontier" not in report([search_run])
    # two runs: the frontier run's section is named after it, the other has none
    both = render_text(build_sections([load_run(frontier_run), load_run(search_run)]))
    assert both.count("Stability frontier") == 1 and "Stability frontier: frontier" in both


# --- the map -----------------------------------------------------------------------------------

def _frontier_lines(fig: Figure) -> dict[str, list[Any]]:
    """label -> [x, colour, linestyle] of every frontier line on every panel."""
    out: dict[str, list[Any]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("frontier "):
                x = np.asarray(line.get_xdata(), float)
                assert x[0] == x[1]  # vertical
                out.setdefault(label, []).append((float(x[0]), line.get_color(),
                                                  line.get_linestyle()))
    return out


def test_map_draws_the_frontier(frontier_run: Path, tmp_path: Path) -> None:
    fig = stability_map([load_run(frontier_run)])
    lines = _frontier_lines(fig)
    a, b, c, d, e, f = (f"frontier {ROWS[k]['label'].removeprefix('precision ')}"
                        for k in "ABCDEF")
    assert lines == {
        f"{a}: not settled (1e-4..-)": [(1e-4, COLOURS["fp32"], ":")],
        f"{b}: stable to the upper bound 1e-1":
            [(HIGH, COLOURS["fp32"], "-")],
        f"{c}: 3.1e-4..3.9e-4": [(3.1e-4, COLOURS["fp16-amp"], "-")],
        f"{d}: 2.4e-2..2.9e-2": [(2.4e-2, COLOURS["fp16-amp"], "--")],
        f"{e}: unstable at the lower bound 1e-5":
            [(LOW, COLOURS["fp16"], "--")],
        f"{f}: not settled (-..1e-2)":
            [(1e-2, COLOURS["bf16-amp"], ":")],
    }  # G (error) draws nothing
    ax = fig.axes[0]
    markers = [str(line.get_marker()) for line in ax.get_lines()]
    assert markers.count(">") == 1 and markers.count("<") == 1  # the open ends
    assert len(ax.patches) == 2  # the bands of C and D (bracketed)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"{c}:\n  3.1e-4..3.9e-4" in legend and "stable to the upper bound" in legend
    # the same trials without frontier.parquet: none of it
    plain = tmp_path / "plain"
    shutil.copytree(frontier_run, plain)
    (plain / FRONTIER_FILE).unlink()
    bare = stability_map([load_run(plain)])
    assert _frontier_lines(bare) == {} and len(bare.axes[0].patches) == 0


def test_map_with_one_panel_per_precision_draws_each_precision_on_its_own(
        frontier_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "FACET_ABOVE", 0)
    fig = stability_map([load_run(frontier_run)])
    for ax in fig.axes:
        precision = ax.get_title().split("\n")[0].split(": ")[1]
        labels = [str(line.get_label()) for line in ax.get_lines()
                  if str(line.get_label()).startswith("frontier ")]
        assert labels and all(label.startswith(f"frontier {precision},") for label in labels)


# --- best --frontier --margin ------------------------------------------------------------------

LEFT_OUT = ("8 of 12 trials left out (2 with lr above the margin, 2 whose combination is "
            "unstable at the lower bound, 1 whose combination has no stable lr yet (searching), "
            "3 whose combination has no verdict (error))")


def test_margin_keeps_trials_below_margin_times_stable_lr(search_run: Path,
                                                          frontier_run: Path) -> None:
    # SMALL against ROWS: t00 (3e-5 <= 0.5 x 1e-4), t02, t06 (1e-4 <= 1.55e-4) and t10 are
    # kept; t01 and t07 are above their margin; t04's combination (F) has no stable lr yet
    trial_id, config, header = best_config(search_run, frontier_run, 0.5)
    assert trial_id == "t06" and config["lr"] == 1e-4 and config["precision"] == "fp16-amp"
    lines = header.splitlines()
    assert lines[0] == (f"restricted by the frontier of {frontier_run}: lr <= 0.5 x the stable "
                        f"lr of the trial's combination; {LEFT_OUT}")
    assert lines[1].startswith(f"best completed trial t06 of {search_run}: best val loss 0.22")
    assert best_config(search_run, frontier_run, 1.0)[0] == "t06"
    # 0.3 x 3.1e-4 < 1e-4: t06 is out too; t00 (3e-5 == 0.3 x 1e-4) is the best left
    assert best_config(search_run, frontier_run, 0.3)[0] == "t00"
    assert best_config(search_run, frontier_run)[0] == "t06"  # the default margin, 0.5
    assert best_config(search_run)[0] == "t01"  # without a frontier: as before


def test_the_margin_is_inclusive_and_an_unmatched_trial_is_left_out(search_run: Path,
                                                                    tmp_path: Path) -> None:
    rows = [r for k, r in ROWS.items() if k != "B"]  # fp32 x fp16 (t02) has no row now
    rows.append(row("bf16-amp", "fp16", "bracketed", 1e-3, 1.2e-3, **spread(2, 2)))  # t04
    other = write_frontier_run(tmp_path / "other", [r for r in rows if r is not ROWS["F"]])
    header = best_config(search_run, other, 0.5)[2]
    # t04 ran at 5e-4 == 0.5 x 1e-3: kept
    assert header.splitlines()[0].endswith(
        "8 of 12 trials left out (2 with lr above the margin, 1 with no matching combination "
        "in the frontier, 2 whose combination is unstable at the lower bound, 3 whose "
        "combination has no verdict (error))")


def test_a_confirmed_winner_above_the_margin_is_not_chosen(frontier_run: Path,
                                                           tmp_path: Path) -> None:
    run_dir = write_confirmed_sweep(tmp_path / "confirmed")
    assert best_config(run_dir)[0] == "t01"
    trial_id, _, header = best_config(run_dir, frontier_run, 0.5)
    lines = header.splitlines()
    # t01 (3e-4 > 0.5 x 1e-4) and t03 (its combination errored) are left out with their seeds
    assert trial_id == "t06"
    assert lines[1].startswith(f"best configuration of {run_dir}: t06 (config of trial t06)")
    assert lines[2].startswith("mean best val loss 0.238 +- 0.002 over 2 seeds")


def test_fixed_settings_of_the_search_run_match_the_combination(frontier_run: Path,
                                                                tmp_path: Path) -> None:
    fixed = {**FIXED, "precision": "fp16-amp", "variant": "fp16"}
    trials = [Synth("s0", "fp16-amp", "fp16", 1e-4, 0, None, "completed", 0.3),
              Synth("s1", "fp16-amp", "fp16", 2e-4, 0, None, "completed", 0.2)]
    run_dir = write_sweep(tmp_path / "fixed", trials, fixed=fixed,
                          space={"lr": {"loguniform": [LOW, HIGH]}})
    path = run_dir / "trials.parquet"  # as the engine records it: searched keys only
    table = pq.read_table(path)
    for name in ("precision", "variant"):
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.nulls(table.num_rows, pa.string()))
    pq.write_table(table, path)
    trial_id, config, header = best_config(run_dir, frontier_run, 0.5)
    assert trial_id == "s0" and config["precision"] == "fp16-amp"  # s1: 2e-4 > 1.55e-4
    assert header.splitlines()[0].endswith("1 of 2 trials left out (1 with lr above the margin)")


def test_keys_outside_trial_config_match_through_config_json() -> None:
    trials = pa.table({
        "lr": [1e-3, 1e-3, 5e-3, 1e-3],
        "precision": ["fp32", "fp32", "fp32", "fp32"],
        "config_json": ['{"diverge_spread": 0.5}', '{"diverge_spread": 1}', None,
                        '{"diverge_spread": 1.0}'],
    })
    frontier = pa.Table.from_pylist([
        {**row("fp32", "x", "bracketed", 4e-3, 5e-3), "label": "diverge_spread 1",
         "combo_json": '{"diverge_spread": 1, "precision": "fp32"}'},
        {**row("fp32", "x", "bracketed", 2e-3, 3e-3), "label": "diverge_spread 0",
         "combo_json": '{"diverge_spread": 0, "precision": "fp32"}'}], schema=FRONTIER_SCHEMA)
    keep, counts = within_margin(trials, frontier, 0.5, fixed={"diverge_spread": 0})
    # row 0: 0.5 matches no combination; row 2 takes the fixed 0: 5e-3 > 0.5 x 2e-3
    assert keep.tolist() == [False, True, False, True]
    assert counts == {"with lr above the margin": 1,
                      "with no matching combination in the frontier": 1}


def test_cli_best_with_a_frontier(search_run: Path, frontier_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["best", str(search_run), "--frontier", str(frontier_run),
                 "--margin", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"# restricted by the frontier of {frontier_run}: lr <= 0.5 "
                                   f"x the stable lr of the trial's combination; {LEFT_OUT}")
    assert "lr: 0.0001\n" in out and "precision: fp16-amp\n" in out
    assert main(["best", str(search_run), "--frontier", str(frontier_run), "--format",
                 "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["lr"] == 1e-4
    assert captured.err.startswith("tune-sana: restricted by the frontier of")
    assert best(search_run, "yaml", frontier_run, 0.5) == out


@pytest.mark.parametrize(("argv", "message"), [
    (["--margin", "0.5"], "--margin 0.5 needs --frontier RUN_DIR (the frontier run whose "
                          "stable lr it scales); add --frontier, or drop --margin"),
    (["--frontier", "F", "--margin", "0"], "--margin 0: must be in (0, 1]"),
    (["--frontier", "F", "--margin", "1.5"], "--margin 1.5: must be in (0, 1]"),
    (["--frontier", "F", "--margin", "nan"], "--margin nan: must be in (0, 1]"),
    (["--frontier", "S"], "no frontier.parquet there; pass the run dir of a "
                          "'search.algorithm: frontier' sweep"),
    (["--frontier", "F", "--margin", "0.01"], "no completed trial within --margin 0.01 of its "
                                              "combination's stable lr (11 of 12 trials left out"),
])
def test_cli_best_margin_errors(search_run: Path, frontier_run: Path, argv: list[str],
                                message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(frontier_run) if a == "F" else str(search_run) if a == "S" else a for a in argv]
    assert main(["best", str(search_run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_margin_errors_from_python(search_run: Path) -> None:
    with pytest.raises(UserError, match="needs --frontier"):
        best_config(search_run, None, 0.5)
    with pytest.raises(UserError, match=r"must be in \(0, 1\]"):
        best_config(search_run, search_run, -1.0)
