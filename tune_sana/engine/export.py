"""``tune-sana export <run dir> --trial <id>``: the trained weights of one completed trial.

A sweep does not keep its trials' final weights (a sweep of hundreds of trials would write
hundreds of models, most of them diverged or pruned). Trials can checkpoint: with
``checkpoint_every`` set (default: never) a trial saves its training state every N steps, and
Ray keeps the latest one in the trial's folder so that a trial whose process died is retried
from it. That checkpoint is for retries: it is the state at the last multiple of
``checkpoint_every`` (the final one only when ``steps`` is a multiple of it), in the trial's
resume format rather than a loadable model. Export therefore re-runs the chosen trial: its
configuration is read back from the run (its effective configuration,
:func:`tune_sana.analysis.runs.effective_configs`: the searched values from its
``trials.parquet`` row, the fixed settings from ``sweep.yaml``), the trial program
``trials.sana_finetune.run`` trains it again (the same seed gives the same batches, noise,
timesteps and initialisation, so on the same device the run repeats), and what it trained is
saved by :func:`tune_sana.training.lora.save_trained`:

- ``finetune: full``: a diffusers transformer folder (config.json + safetensors), loadable with
  ``SanaTransformer2DModel.from_pretrained`` or as ``model: <folder>`` in a later sweep;
- ``finetune: lora``: ``pytorch_lora_weights.safetensors``, loadable with
  ``SanaPipeline.load_lora_weights(folder)``.

``export.json`` next to the weights records the trial, its configuration, and the recorded and
reproduced final validation losses; a mismatch (another device, nondeterministic GPU kernels) is
reported, not hidden.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from tune_sana.analysis.runs import effective_configs
from tune_sana.config import TrialConfig, UserError, build_config
from tune_sana.outcomes import Outcome
from tune_sana.record.readers import read_run_spec, read_trials
from tune_sana.record.schema import CONFIG_FIELDS
from tune_sana.record.storage import is_uri
from tune_sana.training.lora import save_trained

EXPORT_FILE = "export.json"
_RTOL = 1e-4  # relative difference of val loss still called "reproduced"


def trial_row(run_dir: Path, trial_id: str) -> dict[str, Any]:
    """The trial's trials.parquet row; UserError listing some ids if it is not there."""
    table = read_trials(run_dir)
    rows = table.filter(pc.equal(table["trial_id"], trial_id)).slice(0, 1).to_pylist()
    if not rows:
        known = [str(t) for t in table.column("trial_id").to_pylist()]
        listed = ", ".join(known[:8]) + (" ..." if len(known) > 8 else "")
        raise UserError(f"{run_dir}: no trial '{trial_id}' in trials.parquet"
                        f" (finished trials: {listed or 'none yet'})")
    return dict(rows[0])


def trial_config(run_dir: Path, row: dict[str, Any]) -> TrialConfig:
    """The configuration the trial ran with: its effective configuration (a searched key as
    recorded, null included: ``max_grad_norm: null`` was a real choice; any other null takes
    the run's fixed value, else TrialConfig's default). UserError for a run of another trial
    program than sana_finetune (it has no weights to export)."""
    spec = read_run_spec(run_dir)
    if spec.trial != "sana_finetune":
        raise UserError(f"{run_dir}: trial program '{spec.trial}' has no weights to export; "
                        "export works for sana_finetune runs")
    recorded = pa.table({f.name: pa.array([row.get(f.name)], f.type) for f in CONFIG_FIELDS})
    values = effective_configs(recorded, spec).to_pylist()[0]
    return build_config(values, source=f"{run_dir.name}/{row['trial_id']}")


def _check_exportable(row: dict[str, Any]) -> None:
    outcome = row.get("outcome")
    if outcome == Outcome.COMPLETED.value:
        return
    trial = row["trial_id"]
    if outcome == Outcome.DIVERGED.value:
        why = f"diverged ({row.get('divergence_cause')} at step {row.get('diverged_step')})"
    elif outcome == Outcome.PRUNED.value:
        why = (f"was pruned by the scheduler after {row.get('steps_run')} steps, so its "
               "configured schedule never ran to the end")
    else:
        why = f"ended '{outcome}'"
    raise UserError(f"trial {trial} {why}; only completed trials can be exported "
                    "(to train this configuration in full: tune-sana trial --set ...)")


def _same(recorded: float | None, reproduced: float | None) -> bool:
    if recorded is None or reproduced is None:
        return recorded is reproduced
    return math.isclose(recorded, reproduced, rel_tol=_RTOL, abs_tol=1e-7)


def export(run_dir: str | os.PathLike[str], trial_id: str,
           out: str | os.PathLike[str] | None = None, device: str | None = None,
           force: bool = False) -> Path:
    """Re-run a completed trial and save its weights to ``out`` (default
    ``<run dir>/export/<trial id>``); returns the folder. UserError for an unknown or unfinished
    trial, an existing ``out`` without ``force``, or a re-run that does not complete."""
    from trials import sana_finetune
    from tune_sana.data.cache import prepare_data
    from tune_sana.training.demo_base import ensure_demo_base

    if is_uri(run_dir):
        raise UserError(f"{run_dir}: export reads a local run folder; copy the run from its "
                        "storage first (e.g. pyarrow.fs.copy_files), then export from the copy")
    run = Path(run_dir).expanduser().resolve()
    row = trial_row(run, trial_id)
    _check_exportable(row)
    config = trial_config(run, row)
    updates: dict[str, Any] = {"data": prepare_data(config.data, config.model)}
    if device is not None:
        updates["device"] = device
    config = build_config({**config.model_dump(), **updates}, source="export")
    target = Path(out).expanduser() if out else run / "export" / trial_id
    if target.exists() and any(target.iterdir()) and not force:
        raise UserError(f"{target} already exists; pass --force to replace it or --out elsewhere")
    if config.model == "demo-base":
        ensure_demo_base()

    print(f"tune-sana: re-running trial {trial_id} ({config.steps} steps, {config.finetune.value}"
          f" fine-tune) to export its weights", file=sys.stderr, flush=True)
    models: list[nn.Module] = []
    summary = sana_finetune.run(config, lambda row: None, on_model=models.append)
    if summary["outcome"] != Outcome.COMPLETED.value:
        cause, step = summary.get("divergence_cause"), summary.get("diverged_step")
        raise UserError(f"re-running trial {trial_id} ended '{summary['outcome']}' ({cause} at "
                        f"step {step}) although the sweep completed it: the run does not repeat "
                        f"on {summary.get('ran_on')}; try --device with the sweep's device")

    recorded, reproduced = row.get("final_val_loss"), summary.get("final_val_loss")
    record = {
        "run_dir": str(run),
        "trial_id": trial_id,
        "finetune": config.finetune.value,
        "config": config.as_row(),
        "recorded_final_val_loss": recorded,
        "reproduced_final_val_loss": reproduced,
        "reproduced": _same(recorded, reproduced),
        "ran_on": summary.get("ran_on"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_trained(models[0], config, tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not record["reproduced"]:
        print(f"tune-sana: warning: final val loss {reproduced} differs from the recorded "
              f"{recorded} (another device or nondeterministic kernels)", file=sys.stderr)
    return target
