"""The sweep's record on disk, declared once: file names, the two Parquet schemas (versioned)
and the metadata every file carries.

    <run dir>/sweep.yaml        the resolved spec, exactly as run
    <run dir>/trials.parquet    one row per finished trial (config columns + outcome + summary)
    <run dir>/trials_parts/     while a sweep runs: one small file per trial finished since
                                trials.parquet was last compacted (compaction.py)
    <run dir>/history/*.parquet one row per reported step: part-* files as flushed, compact-*
                                files of at least compaction.HISTORY_ROWS rows (compaction.py)
    <run dir>/quarantine/       history parts a resume found corrupt, moved aside (quarantine.py)

Each file's metadata carries the schema version, library versions, the hardware and the sweep
spec. NaN never reaches these files: metrics are finite floats or null (``outcomes.clean``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import types
import typing
from typing import Any

import pyarrow as pa

from tune_sana.config import TrialConfig

# 2: history retain_loss and a step-0 row (the untouched base); trials base_val_loss,
#    improvement, base/final_retain_loss, stage and config_id. Step = optimizer updates done.
# 3: trials combo_id (the frontier search's combination of categorical settings); the run's
#    frontier.parquet.
#    + trials damaged_at_load, native_base_val_loss (step-0 val, native precision); collapsed.
#    + trials peak_memory_kind: what peak_memory_mb measured (cuda_max_allocated, cpu_peak_rss).
#    + trials workers (processes of a multi-worker trial) and nonfinite_rank (which saw it).
#    + trials node: the Ray node id of the trial's (last) attempt.
SCHEMA_VERSION = 3
TRIALS_FILE = "trials.parquet"
FRONTIER_FILE = "frontier.parquet"
HISTORY_DIR = "history"
SPEC_FILE = "sweep.yaml"
QUARANTINE_DIR = "quarantine"
TRIALS_PARTS_DIR = "trials_parts"
COMPACT_PREFIX = "compact-"  # a history file that replaced the parts its metadata names
# Metadata of trials.parquet and of a compact-* history file: a JSON list of the part file names
# whose rows it holds; readers skip those parts (a compaction killed before deleting them).
COVERS_KEY = b"tune_sana.covers"

HISTORY_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("retain_loss", pa.float64()),
    pa.field("grad_norm", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("loss_scale", pa.float64()),
    pa.field("skipped", pa.bool_()),
    pa.field("step_time_s", pa.float64()),
    pa.field("timestamp", pa.float64()),
])

# Summary columns of trials.parquet, after the config columns.
SUMMARY_FIELDS: list[pa.Field] = [
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("divergence_cause", pa.string()),
    pa.field("diverged_step", pa.int64()),
    pa.field("nonfinite_at", pa.string()),
    pa.field("nonfinite_module", pa.string()),
    pa.field("max_abs_activation", pa.float64()),
    pa.field("nonfinite_rank", pa.int64()),  # multi-worker trials: the rank that saw it first
    pa.field("best_val_loss", pa.float64()),
    pa.field("final_val_loss", pa.float64()),
    pa.field("base_val_loss", pa.float64()),
    pa.field("improvement", pa.float64()),
    pa.field("base_retain_loss", pa.float64()),
    pa.field("final_retain_loss", pa.float64()),
    pa.field("steps_run", pa.int64()),
    pa.field("skipped_steps", pa.int64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("steps_per_s", pa.float64()),
    pa.field("peak_memory_mb", pa.float64()),
    pa.field("ran_on", pa.string()),
    pa.field("node", pa.string()),  # the Ray node id its (last) attempt ran on
    pa.field("pairing", pa.string()),
    pa.field("n_params", pa.int64()),
    pa.field("workers", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("retries", pa.int64()),
    pa.field("damaged_at_load", pa.bool_()),
    pa.field("native_base_val_loss", pa.float64()),
    pa.field("peak_memory_kind", pa.string()),  # cuda_max_allocated | cpu_peak_rss
    pa.field("stage", pa.string()),
    pa.field("config_id", pa.string()),
    pa.field("combo_id", pa.string()),
    pa.field("config_json", pa.string()),
    pa.field("ended_at", pa.float64()),
]


def _arrow_type(annotation: Any) -> pa.DataType:
    """Arrow type of a TrialConfig field: int64, float64, bool or string (enums, literals)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arrow_type(args[0])
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    return pa.string()


CONFIG_FIELDS: list[pa.Field] = [
    pa.field(name, _arrow_type(info.annotation)) for name, info in TrialConfig.model_fields.items()
]
TRIALS_SCHEMA = pa.schema(
    [pa.field("trial_id", pa.string(), nullable=False), *CONFIG_FIELDS, *SUMMARY_FIELDS]
)
CONFIG_NAMES: tuple[str, ...] = tuple(f.name for f in CONFIG_FIELDS)


# frontier.parquet: one row per combination of the categorical settings of a frontier search
# (engine/frontier.py), rewritten atomically as its bracket narrows. lr values are the searched
# key's (the one loguniform dimension); "seeds" count trials run at that lr with distinct seeds.
FRONTIER_SCHEMA = pa.schema([
    pa.field("combo_id", pa.string(), nullable=False),  # trials.parquet rows carry it too
    pa.field("combo_json", pa.string(), nullable=False),  # {key: value} of the categoricals
    pa.field("label", pa.string(), nullable=False),  # "precision fp16-amp, attention_fp32 true"
    pa.field("lr_key", pa.string(), nullable=False),  # the bisected key (lr)
    # bracketed | stable_to_upper | unstable_at_lower | searching (budget ran out) | error
    pa.field("verdict", pa.string(), nullable=False),
    pa.field("lr_low", pa.float64()),  # the space's bounds
    pa.field("lr_high", pa.float64()),
    pa.field("stable_lr", pa.float64()),  # largest lr finite in every seed run there
    pa.field("diverged_lr", pa.float64()),  # smallest lr above it that diverged in any seed
    pa.field("ratio", pa.float64()),  # diverged_lr / stable_lr
    pa.field("tolerance", pa.float64()),
    pa.field("stable_seeds", pa.int64()),  # seeds run at stable_lr (all finite)
    pa.field("diverged_seeds", pa.int64()),  # seeds run at diverged_lr
    pa.field("diverged_count", pa.int64()),  # of those, how many diverged
    pa.field("divergence_cause", pa.string()),  # at diverged_lr: the first diverged seed's
    pa.field("diverged_step", pa.int64()),
    pa.field("nonfinite_module", pa.string()),
    pa.field("trials", pa.int64()),  # frontier trials run for this combination
    pa.field("trial_steps", pa.int64()),  # their steps, summed
    pa.field("error", pa.string()),  # verdict error: the trial's message
    pa.field("probes_json", pa.string()),  # [[lr, seed, outcome, steps], ...] by lr, seed
    pa.field("updated_at", pa.float64()),
])


def file_metadata(spec_yaml: str = "") -> dict[bytes, bytes]:
    """Schema version, library versions, hardware and the sweep's spec, for every file written."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    info = {
        "tune_sana.schema_version": str(SCHEMA_VERSION),
        "tune_sana.versions": json.dumps({n: version(n) for n in
                                          ("tune-sana", "torch", "diffusers", "ray", "optuna",
                                           "pyarrow")}),
        "tune_sana.hardware": json.dumps(_hardware()),
        "tune_sana.spec": spec_yaml,
    }
    return {k.encode(): v.encode() for k, v in info.items()}


def _hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}
    torch: Any = sys.modules.get("torch")  # the record never imports torch; a trainer has
    if torch is not None and torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


