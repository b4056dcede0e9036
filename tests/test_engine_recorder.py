"""The driver's recorder, driven without Ray's loop: Tune's hooks called with stand-in trials,
the real recorder and the real Parquet writer underneath."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tune_sana.engine import space
from tune_sana.engine.recorder import ResultsRecorder
from tune_sana.record.readers import read_trials


@dataclass
class FakeTrial:
    """What the recorder reads of a ray.tune Trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"
    num_failures: int = 0
    error_msg: str | None = None


def _recorder(run_dir: Path, raw: dict[str, Any]) -> ResultsRecorder:
    spec = space.parse_spec(raw, "test")
    recorder = ResultsRecorder(str(run_dir), spec.to_yaml(), progress_every_s=0.0,
                               stream=io.StringIO(), fixed=dict(spec.fixed))
    recorder.setup()
    return recorder


def _prune_and_fail(recorder: ResultsRecorder, config: dict[str, Any]) -> dict[str, Any]:
    """One trial stopped by the scheduler after two steps, one that raised: their rows."""
    pruned = FakeTrial("pruned_1", config)
    failed = FakeTrial("failed_1", config, error_msg="Traceback...\nRuntimeError: boom")
    for trial in (pruned, failed):
        recorder.on_trial_start(0, [pruned, failed], trial)
    for step in range(2):
        result = {"step": step, "train_loss": 0.5, "val_loss": 0.4 if step else None}
        pruned.last_result = result
        recorder.on_trial_result(0, [pruned, failed], pruned, result)
    recorder.on_trial_complete(0, [pruned, failed], pruned)
    recorder.on_trial_error(0, [pruned, failed], failed)
    recorder.on_experiment_end([pruned, failed])
    return {row["trial_id"]: row for row in read_trials(recorder.run_dir).to_pylist()}


@pytest.mark.parametrize(
    ("fixed", "searched", "config", "pairing"),
    [
        # precision fixed, variant searched: the pair is native or crossed all the same
        ({"precision": "fp16-amp"}, {"variant": {"choice": ["fp16", "bf16"]}},
         {"variant": "bf16"}, "crossed"),
        ({"precision": "bf16", "variant": "bf16"}, {"lr": {"loguniform": [1e-5, 1e-2]}},
         {"lr": 1e-3}, "native"),
        # neither fixed nor searched: TrialConfig's default precision (fp32) has no pair
        ({"variant": "fp16"}, {"lr": {"loguniform": [1e-5, 1e-2]}}, {"lr": 1e-3}, "n/a"),
        # precision searched (this always worked)
        ({"variant": "fp16"}, {"precision": {"choice": ["fp16-amp"]}},
         {"precision": "fp16-amp"}, "native"),
    ],
)
def test_pruned_and_errored_trials_get_their_pairing(
        tmp_path: Path, fixed: dict[str, Any], searched: dict[str, Any], config: dict[str, Any],
        pairing: str) -> None:
    recorder = _recorder(tmp_path / "run", {"trial": "sana_finetune",
                                            "fixed": {"steps": 10, **fixed}, "space": searched})
    rows = _prune_and_fail(recorder, config)
    assert rows["pruned_1"]["outcome"] == "pruned" and rows["failed_1"]["outcome"] == "error"
    assert rows["failed_1"]["error"] == "RuntimeError: boom"
    assert rows["pruned_1"]["pairing"] == rows["failed_1"]["pairing"] == pairing
    assert rows["pruned_1"]["precision"] == {**fixed, **config}.get("precision")


def test_a_trial_program_without_precision_gets_no_pairing(tmp_path: Path) -> None:
    recorder = _recorder(tmp_path / "run", {"trial": "synthetic", "fixed": {"steps": 10},
                                            "space": {"lr": {"loguniform": [1e-5, 1e-2]}}})
    rows = _prune_and_fail(recorder, {"lr": 1e-3})
    assert rows["pruned_1"]["pairing"] is None and rows["failed_1"]["pairing"] is None
