"""The best completed trial's configuration, as YAML or JSON that ``tune-sana trial --config``
(or a search space's ``fixed:`` block) takes as it is.

Best = lowest best validation loss among ``completed`` trials (ties: the smaller trial id);
pruned, diverged, errored and running trials never qualify. The values are the trial's
effective configuration (:func:`tune_sana.analysis.runs.effective_configs`); the keys are
TrialConfig fields only: the ones the run searched or fixed (from its spec) plus any other
recorded non-null value, so settings left at TrialConfig's default are not printed. Values are
plain (str, int, float, bool, None: a searched or fixed null stays null). The result is
validated with ``build_config`` before it is returned.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import pyarrow.compute as pc
import yaml

from tune_sana.analysis.runs import effective_configs
from tune_sana.config import UserError, build_config
from tune_sana.outcomes import Outcome
from tune_sana.record.readers import read_run_spec, read_trial_columns
from tune_sana.record.schema import CONFIG_NAMES


def best_trial(run_dir: str | os.PathLike[str]) -> tuple[str, float, dict[str, Any]]:
    """(trial id, best validation loss, config dict) of the best completed trial of a run
    (a local folder or a URI); the config's keys are as the module says, in TrialConfig's
    order."""
    trials = read_trial_columns(run_dir, ["trial_id", *CONFIG_NAMES, "outcome", "best_val_loss"])
    done = trials.filter(pc.and_(pc.equal(trials["outcome"], Outcome.COMPLETED.value),
                                 pc.is_valid(trials["best_val_loss"])))
    if done.num_rows == 0:
        seen = ", ".join(f"{v['counts']} {v['values']}" for v in
                         trials["outcome"].value_counts().to_pylist()) or "none finished"
        raise UserError(f"{run_dir}: no completed trial yet ({seen}); wait for the sweep to "
                        "finish trials, or see 'tune-sana report' for why none completed")
    best = done.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")]).slice(0, 1)
    spec = read_run_spec(run_dir)
    recorded = best.select(list(CONFIG_NAMES)).to_pylist()[0]
    effective = effective_configs(best, spec).select(list(CONFIG_NAMES)).to_pylist()[0]
    shown = set(spec.fixed) | spec.searched | {k for k, v in recorded.items() if v is not None}
    config = {k: v for k, v in effective.items() if k in shown}
    build_config(config, source=f"best trial of {run_dir}")
    return (str(best["trial_id"][0].as_py()), float(best["best_val_loss"][0].as_py()), config)


def format_config(config: dict[str, Any], fmt: Literal["yaml", "json"] = "yaml",
                  header: str = "") -> str:
    """YAML (with ``header`` as comment lines) or JSON text of a config dict."""
    if fmt == "json":
        return json.dumps(config, indent=2) + "\n"
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(config, sort_keys=False)


def best(run_dir: str | os.PathLike[str], fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The text ``tune-sana best`` prints."""
    trial_id, val, config = best_trial(run_dir)
    header = (f"best completed trial {trial_id} of {run_dir}: best val loss {val:.6g}\n"
              f"use: tune-sana trial --config <this file>")
    return format_config(config, fmt, header)
