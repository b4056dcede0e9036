"""The effective configuration: one rule (analysis.runs.effective_configs) behind the report,
``tune-sana best`` and ``tune-sana export``; and the run's spec, read in one place
(record.readers.read_spec / read_run_spec)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_sana.analysis.best import best_config, best_trial
from tune_sana.analysis.runs import effective_configs, load_run
from tune_sana.config import TrialConfig, UserError, build_config
from tune_sana.engine.export import trial_config, trial_row
from tune_sana.record.readers import RunSpec, read_run_spec, read_spec
from tune_sana.record.schema import CONFIG_NAMES, SPEC_FILE, TRIALS_FILE
from tune_sana.testing.sweeps import (
    FIXED,
    Synth,
    write_confirmed_sweep,
    write_small_sweep,
    write_sweep,
)

# precision fixed (not TrialConfig's default fp32), the spike check fixed off (a fixed null),
# lr and max_grad_norm searched, max_grad_norm with a null choice (clipping off).
RUN_FIXED = {**FIXED, "precision": "bf16-amp", "loss_spike_factor": None}
RUN_SPACE = {"lr": {"loguniform": [1e-5, 1e-1]}, "max_grad_norm": {"choice": [None, 1.0]}}


class Searched(Synth):
    """A synthetic trial whose recorded config holds the searched keys only, as Ray's does."""

    @property
    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "max_grad_norm": self.max_grad_norm}


TRIALS = [
    Searched("e0", "bf16-amp", "bf16", 2e-4, 0, None, "completed", 0.18),  # best: clip off
    Searched("e1", "bf16-amp", "bf16", 3e-4, 0, 1.0, "completed", 0.20),
    Searched("e2", "bf16-amp", "bf16", 3e-3, 0, None, "diverged", steps=31,
             cause="nonfinite_loss", diverged_step=30),
    Searched("e3", "bf16-amp", "bf16", 1e-4, 0, 1.0, "pruned", 0.35, steps=40),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("effective") / "run", TRIALS, fixed=RUN_FIXED,
                       space=RUN_SPACE)


def test_report_best_and_export_agree(run_dir: Path) -> None:
    recorded = pq.read_table(run_dir / TRIALS_FILE)
    assert recorded["precision"].null_count == len(TRIALS)  # fixed: not in the record
    trials = load_run(run_dir).trials
    report = {r["trial_id"]: {k: r[k] for k in CONFIG_NAMES} for r in trials.to_pylist()}
    assert set(report) == {"e0", "e1", "e2", "e3"}
    for trial_id, config in report.items():
        exported = trial_config(run_dir, trial_row(run_dir, trial_id))
        assert build_config(config) == exported, trial_id
        assert exported.precision.value == "bf16-amp" and exported.loss_spike_factor is None
    assert report["e0"]["max_grad_norm"] is None and report["e1"]["max_grad_norm"] == 1.0
    assert report["e0"]["variant"] is None  # neither searched nor fixed: the default

    trial_id, _, best = best_trial(run_dir)
    assert trial_id == "e0"
    # best prints the fixed and searched keys (and recorded non-null ones), in TrialConfig's
    # order, with the same values the report and export see
    shown = set(RUN_FIXED) | set(RUN_SPACE)
    assert list(best) == [k for k in TrialConfig.model_fields if k in shown]
    assert best == {k: report["e0"][k] for k in best}
    assert best["max_grad_norm"] is None and best["loss_spike_factor"] is None
    assert build_config(best) == trial_config(run_dir, trial_row(run_dir, "e0"))


def test_effective_config_rules() -> None:
    trials = pa.table({
        "lr": pa.array([1e-4, None], pa.float64()),
        "max_grad_norm": pa.array([None, 1.0], pa.float64()),
        "precision": pa.array([None, "fp16"], pa.string()),
        "warmup_steps": pa.array([None, 5], pa.int64()),
        "loss_spike_factor": pa.array([None, None], pa.float64()),
        "variant": pa.array([None, None], pa.string()),
        "outcome": pa.array([None, None], pa.string()),
    })
    spec = RunSpec(fixed={"precision": "bf16", "loss_spike_factor": None, "warmup_steps": 10},
                   searched=frozenset({"lr", "max_grad_norm"}))
    out = effective_configs(trials, spec)
    assert out.schema == trials.schema
    assert out.to_pydict() == {
        "lr": [1e-4, None],                  # searched: a null stays null
        "max_grad_norm": [None, 1.0],        # searched null: clipping off
        "precision": ["bf16", "fp16"],       # fixed fills a null; a recorded value stays
        "warmup_steps": [10, 5],
        "loss_spike_factor": [None, None],   # fixed null: off, not the default 10.0
        "variant": [None, None],             # default None
        "outcome": [None, None],             # not a config column: untouched
    }
    defaults = effective_configs(trials.select(["precision", "warmup_steps"]), RunSpec())
    assert defaults.to_pydict() == {"precision": ["fp32", "fp16"], "warmup_steps": [0, 5]}


def test_a_fixed_value_that_does_not_fit_its_column_is_a_user_error() -> None:
    trials = pa.table({"steps": pa.array([None], pa.int64())})
    with pytest.raises(UserError, match=r"run/sweep.yaml: fixed steps: 1.5 is not a int64"):
        effective_configs(trials, RunSpec(fixed={"steps": 1.5}, source="run/sweep.yaml"))


def test_spec_read_from_sweep_yaml_else_from_trials_metadata(tmp_path: Path) -> None:
    run = write_small_sweep(tmp_path / "run")
    spec = read_run_spec(run)
    assert spec.trial == "sana_finetune" and spec.fixed == FIXED
    assert spec.searched == {"lr", "precision", "variant", "warmup_steps", "max_grad_norm"}
    raw = read_spec(run)
    (run / SPEC_FILE).unlink()
    assert read_spec(run) == raw  # the copy in trials.parquet's metadata
    assert read_run_spec(run).fixed == FIXED
    assert read_spec(tmp_path) == {} and read_run_spec(tmp_path) == RunSpec(
        source=str(tmp_path / SPEC_FILE))


@pytest.mark.parametrize(("text", "message"), [
    ("fixed: {steps: [1\n", r"sweep.yaml: malformed YAML at line \d+; restore"),
    ("- a\n- b\n", "sweep.yaml: expected a mapping"),
    ("fixed: [steps]\n", "sweep.yaml: 'fixed' must be a mapping"),
])
def test_a_broken_spec_is_a_one_line_user_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / SPEC_FILE).write_text(text)
    with pytest.raises(UserError, match=message) as err:
        read_run_spec(tmp_path)
    assert "\n" not in str(err.value)


def _imported(node: ast.AST) -> list[str]:
    """Dotted names an import statement in tune_sana/analysis/ names (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(["tune_sana", "analysis"][:3 - node.level] + ([base] if base else []))
        return [f"{base}.{a.name}" for a in node.names]
    return []


def test_analysis_modules_never_import_the_report() -> None:
    # report is the top of analysis/: plots and best read runs and tables, never the report
    # (imports inside functions included)
    folder = Path(__file__).resolve().parents[1] / "tune_sana" / "analysis"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not any(n.startswith("tune_sana.analysis.report")
                           for n in _imported(node)), path


def test_confirm_replicas_differ_in_seed_and_best_prints_the_search_trial(tmp_path: Path) -> None:
    # replicas record their fresh seed; the search trial ran with the fixed/default one, and
    # its config is what `tune-sana best` prints for the confirmed winner
    run_dir = write_confirmed_sweep(tmp_path / "run")
    trials = load_run(run_dir).trials
    seeds = dict(zip(trials["trial_id"].to_pylist(), trials["seed"].to_pylist(), strict=True))
    assert (seeds["t01"], seeds["t13"], seeds["t14"]) == (0, 101, 102)
    trial_id, config, _ = best_config(run_dir)
    assert trial_id == "t01" and "seed" not in config  # default: not printed
    assert build_config(config) == trial_config(run_dir, trial_row(run_dir, "t01"))
    replica = trial_config(run_dir, trial_row(run_dir, "t13"))
    assert replica == build_config({**config, "seed": 101})
