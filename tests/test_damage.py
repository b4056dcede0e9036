"""Damage without NaN (training/damage.py): a checkpoint that depends on fp16's attention clip,
run crossed, is flagged damaged_at_load; a learning rate that wrecks the model while staying
finite ends as collapsed; the searcher is told a collapse as infeasible; the report counts it."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import assert_plain, fast_config, run_trial
from tune_sana.config import Precision
from tune_sana.training.damage import (
    CollapseWatch,
    above_collapse,
    damaged,
    needs_native_check,
)
from tune_sana.training.precision import POLICIES

# --- the rules (pure) ----------------------------------------------------------------------------


def test_collapse_needs_patience_evaluations_in_a_row() -> None:
    watch = CollapseWatch(factor=2.0, patience=2, base=1.0)
    assert [watch.update(v) for v in (2.5, 1.5, 2.5, 2.1)] == [False, False, False, True]


def test_collapse_edges() -> None:
    assert not above_collapse(2.0, 1.0, 2.0)  # exactly factor x base is not above it
    assert above_collapse(2.0001, 1.0, 2.0)
    assert not above_collapse(1e9, 1.0, None)  # off
    assert not above_collapse(1e9, None, 2.0)  # no base known
    assert not above_collapse(math.inf, 1.0, 2.0)  # non-finite is a divergence, not a collapse
    assert CollapseWatch(factor=2.0, patience=1, base=1.0).update(3.0)  # patience 1: at once
    watch = CollapseWatch(factor=2.0, patience=2, base=1.0)
    assert [watch.update(v) for v in (3.0, math.nan, 3.0)] == [False, False, False]  # NaN resets
    watch.load_state_dict(watch.state_dict())
    assert (watch.base, watch.run) == (1.0, 1) and watch.update(3.0)


def test_damaged_at_load_edges() -> None:
    assert damaged(1.06, 1.0, 0.05) and not damaged(1.05, 1.0, 0.05)  # worse by MORE than 5%
    assert not damaged(0.5, 1.0, 0.05)  # better than native: not damage
    assert damaged(1.0001, 1.0, 0.0)
    assert not damaged(9.0, None, 0.05) and not damaged(9.0, math.nan, 0.05)  # nothing to compare


@pytest.mark.parametrize(("mode", "variant", "crossed"), [
    (Precision.FP32, "fp16", True),  # fp16 weights in fp32: the clip is gone (diffusers #10336)
    (Precision.BF16_AMP, "fp16", True),
    (Precision.FP16_AMP, "bf16", True),
    (Precision.BF16, "fp16", True),
    (Precision.FP16_AMP, None, True),  # an fp32 checkpoint under autocast
    (Precision.FP16_AMP, "fp16", False),
    (Precision.FP16, "fp16", False),
    (Precision.BF16_AMP, "bf16", False),
    (Precision.BF16, "bf16", False),
    (Precision.FP32, None, False),
])
def test_native_check_only_for_another_compute_dtype(mode: Precision, variant: str | None,
                                                     crossed: bool) -> None:
    assert needs_native_check(POLICIES[mode], variant) is crossed


def test_guard_checkpoints_its_collapse_count(tmp_path: Path) -> None:
    from tune_sana.training.guard import Guard

    guard = Guard(fast_config(), loss_scale=None)
    guard.collapse.base = 1.0
    assert not guard.collapse.update(5.0)
    torch.save(guard.state_dict(), tmp_path / "g.pt")
    restored = Guard(fast_config(), loss_scale=None)
    restored.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert restored.collapse.update(5.0)  # the second evaluation in a row, across the resume


# --- at load: a checkpoint that needs fp16's clip ------------------------------------------------


@pytest.fixture(scope="module")
def clamp_checkpoint(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tune_sana.testing.clamp_checkpoint import build_clamp_checkpoint

    return build_clamp_checkpoint(tmp_path_factory.mktemp("clamp") / "ckpt", demo_base)


@pytest.mark.parametrize("precision", ["fp32", "bf16-amp"])
def test_crossed_fp16_checkpoint_is_flagged_damaged_at_load(clamp_checkpoint: Path,
                                                            precision: str) -> None:
    rows, summary = run_trial(fast_config(model=str(clamp_checkpoint), variant="fp16",
                                          precision=precision, steps=1, eval_every=1))
    assert_plain(rows)
    assert summary["damaged_at_load"] is True
    base, native = summary["base_val_loss"], summary["native_base_val_loss"]
    # measured: fp32 5.35 and bf16-amp 5.35 vs native (fp16) 1.21; the unmodified base 1.20
    assert native < 1.5 < 3.0 < base
    assert summary["outcome"] == "completed"  # a flag, not an outcome: it trains on


def test_native_pair_is_not_flagged_and_pays_nothing(clamp_checkpoint: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from trials import sana_finetune

    def never(self: Any) -> float:
        raise AssertionError("a native pair evaluates its base once")

    monkeypatch.setattr(sana_finetune.Parts, "native_validation", never)
    rows, summary = run_trial(fast_config(model=str(clamp_checkpoint), variant="fp16",
                                          precision="fp16-amp", attention_fp32=True, steps=1,
                                          eval_every=1))
    assert summary["outcome"] == "completed"
    assert summary["damaged_at_load"] is False
    assert summary["native_base_val_loss"] == summary["base_val_loss"] < 1.5
    _, off = run_trial(fast_config(precision="bf16-amp", steps=1, damage_tolerance=None))
    assert off["damaged_at_load"] is None and off["native_base_val_loss"] is None


def test_damaged_trial_reaches_trials_parquet_and_the_report(clamp_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    from tune_sana.analysis.report import report
    from tune_sana.record.readers import read_trials
    from tune_sana.record.writer import ResultsWriter

    run_dir = tmp_path / "run"
    writer = ResultsWriter(run_dir, "trial: sana_finetune\n")
    for trial_id, precision in (("crossed", "fp32"), ("native", "fp16-amp")):
        config = fast_config(model=str(clamp_checkpoint), variant="fp16", precision=precision,
                             attention_fp32=True, steps=1, eval_every=1)
        rows, summary = run_trial(config)
        for row in rows[:-1]:
            writer.add_step(trial_id, row)
        writer.finish_trial(trial_id, config.as_row(), summary)
    writer.flush()
    got = {r["trial_id"]: r for r in read_trials(run_dir).to_pylist()}
    assert got["crossed"]["damaged_at_load"] is True and got["native"]["damaged_at_load"] is False
    assert got["crossed"]["native_base_val_loss"] < 1.5 < 3.0 < got["crossed"]["base_val_loss"]
    text = report([run_dir])
    assert any(line.split() == ["damaged", "at", "load", "1", "of", "2", "checked"]
               for line in text.splitlines())
    section = text[text.index("Damaged at load\n"):].split("\n\n", 1)[0].splitlines()
    assert section[2].split() == ["trial_id", "precision", "variant", "base_val",
                                  "native_base_val", "worse", "outcome"]
    assert section[4].split()[:3] == ["crossed", "fp32", "fp16"]
    assert len(section) == 6  # title, rule, header, rule, one row, the note


# --- during training: a learning rate that wrecks the model without NaN --------------------------


def test_too_high_lr_that_stays_finite_ends_collapsed(demo_base: Path) -> None:
    # measured on the demo base (fp32, clip 1.0, lr 0.1): val 1.20 at step 0, 28.7 at 2,
    # 174 at 4, 93.5 at 6, then 21.5, 25.7, 6.2: finite all along (a completed trial without
    # the collapse rule), above 2 x base from step 2 on
    settings = dict(model=str(demo_base), lr=0.1, max_grad_norm=1.0, steps=12, eval_every=2)
    rows, summary = run_trial(fast_config(**settings))
    assert_plain(rows)
    assert (summary["outcome"], summary["divergence_cause"]) == ("collapsed", "loss_collapse")
    assert summary["diverged_step"] == summary["steps_run"] == summary["step"] == 4
    base = summary["base_val_loss"]
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert len(vals) == 3 and vals[1] > 2 * base and vals[2] > 2 * base
    assert summary["final_val_loss"] == vals[2]
    _, off = run_trial(fast_config(**settings, collapse_factor=None))
    assert off["outcome"] == "completed" and off["steps_run"] == 12  # finite throughout


# --- the engine: searcher and recorder -----------------------------------------------------------


def test_searcher_is_told_a_collapse_as_infeasible() -> None:
    import optuna
    from optuna.samplers._tpe.sampler import _split_trials

    from tests.test_search import SPEC
    from tune_sana.engine.search import build_searcher

    searcher, _ = build_searcher(SPEC)
    searcher.set_search_properties("val_loss", "min", {})
    for trial_id in ("a", "b", "c"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("a", {"val_loss": 0.5, "outcome": "completed"})
    # a collapsed trial's last row holds a finite val loss: it must not be told as one
    searcher.on_trial_complete("b", {"val_loss": 0.4, "outcome": "collapsed",
                                     "divergence_cause": "loss_collapse"})
    searcher.on_trial_complete("c", {"outcome": "diverged", "divergence_cause": "nonfinite_loss"})
    trials = searcher._ot_study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    collapsed, diverged = trials[1], trials[2]
    assert collapsed.constraints == {"collapsed": 1.0} and collapsed.user_attrs["collapsed"]
    assert collapsed.user_attrs["divergence_cause"] == "loss_collapse"
    assert diverged.constraints == {"diverged": 1.0}  # as before
    assert collapsed.value is not None and collapsed.value > 0.5  # a penalty, not its 0.4
    below, above = _split_trials(searcher._ot_study, trials, n_below=1)
    assert [t.number for t in below] == [0] and {t.number for t in above} == {1, 2}


def test_frontier_counts_a_collapse_as_unstable(tmp_path: Path) -> None:
    from tune_sana.engine.frontier import probe_of, recorded_probes
    from tune_sana.record.writer import ResultsWriter

    summary = {"step": 4, "val_loss": 9.0, "outcome": "collapsed", "steps_run": 4,
               "divergence_cause": "loss_collapse", "diverged_step": 4}
    live = probe_of({"lr": 0.1}, summary, "lr")
    assert (live.outcome, live.cause, live.step) == ("diverged", "loss_collapse", 4)
    writer = ResultsWriter(tmp_path, "")
    writer.finish_trial("p1", {"lr": 0.1}, {**summary, "stage": "frontier"})
    [(_, resumed)] = recorded_probes(tmp_path, "lr", [])
    assert (resumed.outcome, resumed.cause) == ("diverged", "loss_collapse")  # not an error


@dataclass
class _Trial:
    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    status: str = "TERMINATED"
    num_failures: int = 0


def test_recorder_keeps_collapsed_as_the_trials_verdict(tmp_path: Path) -> None:
    from tune_sana.engine import space
    from tune_sana.engine.recorder import ResultsRecorder
    from tune_sana.record.readers import read_trials

    spec = space.parse_spec({"trial": "sana_finetune", "fixed": {"steps": 4},
                             "space": {"lr": {"loguniform": [1e-5, 1.0]}}}, "t.yaml")
    stream = io.StringIO()
    recorder = ResultsRecorder(str(tmp_path / "run"), spec.to_yaml(), progress_every_s=0.0,
                               stream=stream, fixed=dict(spec.fixed))
    recorder.setup()
    trial = _Trial("t1", {"lr": 0.1})
    recorder.on_trial_start(0, [trial], trial)
    last = {"step": 4, "val_loss": 9.0, "outcome": "collapsed", "divergence_cause":
            "loss_collapse", "diverged_step": 4, "damaged_at_load": False,
            "native_base_val_loss": 1.2}
    trial.last_result = last
    recorder.on_trial_result(0, [trial], trial, last)
    recorder.on_trial_complete(0, [trial], trial)
    row = read_trials(recorder.run_dir).to_pylist()[0]
    assert (row["outcome"], row["divergence_cause"], row["diverged_step"]) == (
        "collapsed", "loss_collapse", 4)
    assert "collapsed 1" in stream.getvalue()


# --- the report ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unstable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tune_sana.testing.sweeps import Synth, write_sweep

    trials = [
        Synth("c00", "fp32", "fp16", 1e-1, 0, 1.0, "collapsed", steps=40,
              cause="loss_collapse", diverged_step=40, damaged=True, native_base=0.5),
        Synth("c01", "bf16-amp", "fp16", 3e-2, 0, None, "collapsed", steps=20,
              cause="loss_collapse", diverged_step=20, damaged=True, native_base=0.5),
        Synth("c02", "bf16-amp", "fp16", 1e-4, 20, None, "completed", 0.6, damaged=True,
              native_base=0.8),
        Synth("c03", "fp16-amp", "fp16", 1e-4, 20, 1.0, "completed", 0.3, damaged=False,
              native_base=1.0),
        Synth("c04", "fp32", "fp16", 3e-3, 0, None, "diverged", steps=60, cause="loss_spike",
              diverged_step=60, damaged=True, native_base=0.5),
    ]
    return write_sweep(tmp_path_factory.mktemp("unstable") / "run", trials)


def test_report_counts_collapsed_trials(unstable: Path) -> None:
    from tune_sana.analysis.runs import load_run
    from tune_sana.analysis.tables import divergence_causes, stability

    run = load_run(unstable)
    table = stability(run, ["precision"])
    assert table.column_names == ["precision", "trials", "diverged", "collapsed", "pruned",
                                  "completed", "error", "best_val"]
    got = {r["precision"]: r for r in table.to_pylist()}
    assert (got["fp32"]["trials"], got["fp32"]["diverged"], got["fp32"]["collapsed"]) == (2, 1, 1)
    assert (got["bf16-amp"]["collapsed"], got["bf16-amp"]["completed"]) == (1, 1)
    assert got["fp16-amp"]["collapsed"] == 0
    by_cause, by_module, median = divergence_causes(run)
    assert [tuple(r.values()) for r in by_cause.to_pylist()] == [("loss_collapse", 2, 30.0),
                                                                 ("loss_spike", 1, 60.0)]
    assert by_module.column_names == ["nonfinite_module", "trials", "median_step"]
    assert by_module["trials"].to_pylist() == [1]  # diverged trials only
    assert median == 40.0


def test_report_text_and_charts_show_collapse_and_damage(unstable: Path) -> None:
    from tune_sana.analysis.plots import causes_chart, stability_points
    from tune_sana.analysis.report import report
    from tune_sana.analysis.runs import load_run

    text = report([unstable])
    lines = [line.split() for line in text.splitlines()]
    assert ["collapsed", "2"] in lines
    assert ["damaged", "at", "load", "4", "of", "5", "checked"] in lines
    section = text[text.index("Damaged at load\n"):].split("\n\n", 1)[0].splitlines()
    # worst first: c00, c01, c04 are 100% worse than native (1.0 vs 0.5), c02 25%
    assert [s.split()[0] for s in section[4:8]] == ["c00", "c01", "c04", "c02"]
    assert section[7].split()[3:] == ["1", "0.8", "25.0%", "completed"]
    causes = text[text.index("Divergence causes"):].split("\n\n", 1)[0]
    assert "loss_collapse" in causes and "collapsed" in causes
    run = load_run(unstable)
    points = {r["trial_id"]: r for r in stability_points(run).to_pylist()}
    assert points["c00"]["outcome"] == "collapsed" and points["c00"]["y"] == pytest.approx(3.8)
    chart = causes_chart([run])
    labels = [t.get_text() for ax in chart.axes for t in ax.get_yticklabels()]
    assert "loss_collapse" in labels
    assert chart.axes[0].get_xlabel() == "diverged or collapsed trials"
