"""Export: a completed trial's configuration is read back from its run, re-run, and its weights
saved; loading them gives exactly the validation loss the sweep recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_trial
from tune_sana.cli import main
from tune_sana.config import UserError, build_config
from tune_sana.data.cache import prepare_data
from tune_sana.data.encoded import load_data
from tune_sana.engine.export import export, trial_config, trial_row
from tune_sana.engine.space import parse_spec
from tune_sana.record.schema import SPEC_FILE
from tune_sana.record.writer import ResultsWriter
from tune_sana.testing.tiny_sana import build_tiny_pipeline, random_encoded, write_images
from tune_sana.training.models import load_transformer
from tune_sana.training.validation import FixedValidation

FIXED: dict[str, Any] = {"model": "sana-tiny", "steps": 4, "batch_size": 8, "val_batch_size": 16,
                         "eval_every": 2, "device": "cpu", "loss_spike_factor": None}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return random_encoded(tmp_path_factory.mktemp("export") / "encoded")


def make_run(run_dir: Path, fixed: dict[str, Any], searched: dict[str, Any],
             trial_id: str = "t1") -> dict[str, Any]:
    """A run directory as a sweep leaves it (sweep.yaml + trials.parquet + history), with one
    trial run in-process. Like Ray, the trials row gets only the searched values as config."""
    spec = parse_spec({"trial": "sana_finetune", "fixed": fixed,
                       "space": {k: {"choice": [v]} for k, v in searched.items()}}, "test")
    run_dir.mkdir(parents=True)
    (run_dir / SPEC_FILE).write_text(spec.to_yaml())
    rows, summary = run_trial(build_config({**fixed, **searched}, source="test"))
    writer = ResultsWriter(run_dir, spec.to_yaml())
    for row in rows:
        writer.add_step(trial_id, row)
    writer.finish_trial(trial_id, searched, summary)
    return summary


def val_loss(model: torch.nn.Module, encoded: str, fixed: dict[str, Any]) -> float:
    config = build_config(fixed, source="test")
    validate = FixedValidation(load_data(encoded).val, config.val_batch_size, config.logit_mean,
                               config.logit_std, config.flow_shift, torch.device("cpu"),
                               draws=config.val_draws)
    return validate(model, torch.float32)


def test_config_comes_back_from_sweep_yaml_and_the_row(tmp_path: Path, data: str) -> None:
    make_run(tmp_path / "run", {**FIXED, "data": data}, {"lr": 1e-3, "max_grad_norm": None})
    config = trial_config(tmp_path / "run", trial_row(tmp_path / "run", "t1"))
    assert config.lr == 1e-3 and config.steps == 4 and config.model == "sana-tiny"
    assert config.max_grad_norm is None  # a searched null stays null
    assert config.loss_spike_factor is None  # a fixed null is not replaced by the default


def test_full_export_reproduces_the_recorded_val_loss(tmp_path: Path, data: str) -> None:
    fixed = {**FIXED, "data": data}
    summary = make_run(tmp_path / "run", fixed, {"lr": 1e-3})
    out = export(tmp_path / "run", "t1")
    assert out == (tmp_path / "run" / "export" / "t1").resolve()
    record = json.loads((out / "export.json").read_text())
    assert record["reproduced"] and record["finetune"] == "full"
    model = load_transformer(str(out), variant=None, dtype=torch.float32)
    assert val_loss(model, data, fixed) == summary["final_val_loss"]
    with pytest.raises(UserError, match="already exists"):
        export(tmp_path / "run", "t1")


def test_lora_export_loads_into_the_sana_pipeline(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import SanaPipeline

    monkeypatch.setenv("TUNE_SANA_HOME", str(tmp_path / "home"))
    pipe_dir = build_tiny_pipeline(tmp_path / "pipe", variants=())
    write_images(tmp_path / "images", 10)
    cache = prepare_data(str(tmp_path / "images"), str(pipe_dir), device="cpu", val_fraction=0.3,
                         complex_human_instruction=False)
    fixed = {**FIXED, "model": str(pipe_dir), "data": cache, "val_batch_size": 3,
             "batch_size": 4, "finetune": "lora", "lora_rank": 2}
    summary = make_run(tmp_path / "run", fixed, {"lr": 1e-2})

    assert main(["export", str(tmp_path / "run"), "--trial", "t1", "--out",
                 str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "adapter")
    pipe = SanaPipeline.from_pretrained(str(pipe_dir))
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    assert val_loss(pipe.transformer, cache, fixed) == pytest.approx(summary["final_val_loss"],
                                                                    rel=1e-6)


def test_only_completed_trials_export(tmp_path: Path, data: str) -> None:
    run = tmp_path / "run"
    make_run(run, {**FIXED, "data": data}, {"lr": 1e-3})
    writer = ResultsWriter(run, resume=True)
    writer.finish_trial("bad", {"lr": 1.0}, {"outcome": "diverged", "steps_run": 2,
                                             "divergence_cause": "nonfinite_loss",
                                             "diverged_step": 1})
    with pytest.raises(UserError, match="trial bad diverged \\(nonfinite_loss at step 1\\)"):
        export(run, "bad")
    with pytest.raises(UserError, match="no trial 'nope'.*t1"):
        export(run, "nope")
