"""The best configuration of a run, as YAML or JSON that ``tune-sana trial --config`` (or a
search space's ``fixed:`` block) takes as it is, under a header that says how far to trust it.

With a confirm stage, best = the confirmed configuration with the lowest mean best validation
loss over its fresh seeds among those that diverged in no seed (:mod:`noise`); the header gives
its mean +- standard error over n seeds, its improvement over the base, and says plainly when
it cannot be told apart from the runner-up or from the base. The printed config is its search
trial's (a replica of it differs in seed only). Without a confirm stage (or before a confirmed
configuration qualifies), best = the lowest best validation loss among ``completed`` trials
(ties: the smaller trial id), and the header says that it rests on one seed.

With a frontier run (``--frontier RUN --margin X``), only trials whose lr is at most X times
the stable lr of their combination in that run's frontier (:func:`frontier.within_margin`)
qualify, confirm replicas included; the header's first line says how many trials that left out
and why. X is in (0, 1]; 0.5 when only the frontier is given.

Pruned, diverged, errored and running trials never qualify. The values are the trial's
effective configuration (:func:`tune_sana.analysis.runs.effective_configs`); the keys are
TrialConfig fields only: the ones the run searched or fixed (from its spec) plus any other
recorded non-null value, so settings left at TrialConfig's default are not printed. Values are
plain (str, int, float, bool, None: a searched or fixed null stays null). The result is
validated with ``build_config`` before it is returned.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from tune_sana.analysis import frontier as frontier_mod
from tune_sana.analysis.noise import (
    BEATS_BASE,
    BEST,
    CONFIRM,
    CONFIRM_HINT,
    LIKE_BEST,
    confirmed,
    has_confirm,
)
from tune_sana.analysis.runs import effective_configs
from tune_sana.config import UserError, build_config
from tune_sana.outcomes import Outcome
from tune_sana.record.readers import read_run_spec, read_trial_columns
from tune_sana.record.schema import CONFIG_NAMES

USE = "use: tune-sana trial --config <this file>"
DEFAULT_MARGIN = 0.5  # with --frontier and no --margin
_COLUMNS = ["trial_id", *CONFIG_NAMES, "outcome", "best_val_loss", "base_val_loss",
            "improvement", "stage", "config_id", "config_json"]


def _completed(trials: pa.Table) -> pa.Table:
    return trials.filter(pc.and_(pc.equal(trials["outcome"], Outcome.COMPLETED.value),
                                 pc.is_valid(trials["best_val_loss"])))


def _lowest(trials: pa.Table, run_dir: str | os.PathLike[str], every: pa.Table) -> pa.Table:
    """The completed trial of ``trials`` with the lowest best val loss (one row); UserError
    naming the outcomes of ``every`` when there is none."""
    done = _completed(trials)
    if done.num_rows == 0:
        seen = ", ".join(f"{v['counts']} {v['values']}" for v in
                         every["outcome"].value_counts().to_pylist()) or "none finished"
        raise UserError(f"{run_dir}: no completed trial yet ({seen}); wait for the sweep to "
                        "finish trials, or see 'tune-sana report' for why none completed")
    return done.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")]).slice(0, 1)


def _config(row: pa.Table, run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The printed config of a one-row trials table (keys as the module says)."""
    spec = read_run_spec(run_dir)
    recorded = row.select(list(CONFIG_NAMES)).to_pylist()[0]
    effective = effective_configs(row, spec).select(list(CONFIG_NAMES)).to_pylist()[0]
    shown = set(spec.fixed) | spec.searched | {k for k, v in recorded.items() if v is not None}
    config = {k: v for k, v in effective.items() if k in shown}
    build_config(config, source=f"best trial of {run_dir}")
    return config


def best_trial(run_dir: str | os.PathLike[str]) -> tuple[str, float, dict[str, Any]]:
    """(trial id, best validation loss, config dict) of the best completed trial of a run
    (a local folder or a URI), whatever its stage; the config's keys are as the module says,
    in TrialConfig's order."""
    trials = read_trial_columns(run_dir, ["trial_id", *CONFIG_NAMES, "outcome", "best_val_loss"])
    row = _lowest(trials, run_dir, trials)
    return (str(row["trial_id"][0].as_py()), float(row["best_val_loss"][0].as_py()),
            _config(row, run_dir))


def format_config(config: dict[str, Any], fmt: Literal["yaml", "json"] = "yaml",
                  header: str = "") -> str:
    """YAML (with ``header`` as comment lines) or JSON text of a config dict."""
    if fmt == "json":
        return json.dumps(config, indent=2) + "\n"
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(config, sort_keys=False)


def _pm(mean: float, se: float | None, n: int) -> str:
    """'0.21 +- 0.002 over 2 seeds' (with one seed, the standard error is unknown)."""
    if se is None:
        return f"{mean:.4g} over {n} seed{'s' if n != 1 else ''} (standard error unknown)"
    return f"{mean:.4g} +- {se:.2g} over {n} seeds"


def _gain(base: float, mean: float) -> str:
    return "-" if base == 0 else f"{100 * (1 - mean / base):.1f}%"


def check_margin(frontier: str | os.PathLike[str] | None, margin: float | None) -> float | None:
    """The margin to apply (None: no frontier); UserError for --margin without --frontier or
    outside (0, 1]."""
    if frontier is None:
        if margin is not None:
            raise UserError(f"--margin {margin:g} needs --frontier RUN_DIR (the frontier run "
                            "whose stable lr it scales); add --frontier, or drop --margin")
        return None
    margin = DEFAULT_MARGIN if margin is None else margin
    if not 0 < margin <= 1:
        raise UserError(f"--margin {margin:g}: must be in (0, 1], the fraction of the stable "
                        f"lr a trial may use (e.g. --margin {DEFAULT_MARGIN:g})")
    return margin


def _within_frontier(trials: pa.Table, run_dir: str | os.PathLike[str],
                     frontier: str | os.PathLike[str], margin: float) -> tuple[pa.Table, str]:
    """(the trials within ``margin`` of their combination's stable lr in ``frontier``, the
    header line saying how many were left out and why)."""
    table = frontier_mod.read(frontier)
    if table is None:
        raise UserError(f"--frontier {frontier}: no frontier.parquet there; pass the run dir of "
                        "a 'search.algorithm: frontier' sweep")
    spec = read_run_spec(run_dir)
    keep, counts = frontier_mod.within_margin(effective_configs(trials, spec), table, margin,
                                              spec.fixed)
    lr_keys = sorted({k or "lr" for k in table["lr_key"].to_pylist()}) or ["lr"]
    line = frontier_mod.margin_line(frontier, margin, int(keep.sum()), trials.num_rows, counts,
                                    "/".join(lr_keys))
    kept = trials.filter(pa.array(keep))
    if _completed(kept).num_rows == 0:
        raise UserError(f"{run_dir}: no completed trial within --margin {margin:g} of its "
                        f"combination's stable lr ({line.split('; ', 1)[1]}); raise --margin "
                        "(at most 1) or run a frontier over the settings this search used")
    return kept, line


def best_config(run_dir: str | os.PathLike[str], frontier: str | os.PathLike[str] | None = None,
                margin: float | None = None) -> tuple[str, dict[str, Any], str]:
    """(trial id whose config is printed, config dict, header text) of the run's best
    configuration, as the module says; with ``frontier``, among the trials within ``margin``
    of their combination's stable lr there."""
    margin = check_margin(frontier, margin)
    trials = read_trial_columns(run_dir, _COLUMNS)
    if frontier is not None and margin is not None:
        trials, line = _within_frontier(trials, run_dir, frontier, margin)
        trial_id, config, header = _best_of(trials, run_dir)
        return trial_id, config, f"{line}\n{header}"
    return _best_of(trials, run_dir)


def _best_of(trials: pa.Table, run_dir: str | os.PathLike[str]) -> tuple[str, dict[str, Any], str]:
    """:func:`best_config` over ``trials`` (all of the run's, or those a margin kept)."""
    if not has_confirm(trials):
        row = _lowest(trials, run_dir, trials)
        return row["trial_id"][0].as_py(), _config(row, run_dir), _single(row, run_dir, "")
    table = confirmed(trials)
    rows = table.to_pylist()  # one per confirmed configuration (top_k of them)
    winner = next((r for r in rows if r["vs_best"] == BEST), None)
    left_out = [f"{r['config_id']} ({r['diverged']} of {r['seeds']} seeds)"
                for r in rows if r["diverged"]]
    if winner is None:
        pending = [r["config_id"] for r in rows if not r["diverged"] and r["mean"] is None]
        return _unconfirmed(trials, table, run_dir, left_out, pending)
    pick = trials.filter(pc.equal(trials["trial_id"], winner["search_trial"] or ""))
    if pick.num_rows == 0:  # no completed search trial: print a replica's config
        replicas = trials.filter(pc.and_(pc.equal(trials["config_id"], winner["config_id"]),
                                         pc.equal(trials["stage"], CONFIRM)))
        pick = _lowest(replicas, run_dir, trials)
    lines = [f"best configuration of {run_dir}: {winner['config_id']} (config of trial "
             f"{pick['trial_id'][0].as_py()}): the lowest mean of the confirmed "
             "configurations that diverged in no seed",
             f"mean best val loss {_pm(winner['mean'], winner['se'], winner['n'])} "
             "(mean +- standard error over fresh seeds)"]
    if winner["search_val"] is not None:
        lines.append(f"its search trial's own value {winner['search_val']:.4g} is kept apart: "
                     "picked for being low, it is biased low")
    lines.append(_versus_base(winner))
    lines.append(_versus_runner_up(winner, [r for r in rows if r is not winner
                                            and not r["diverged"] and r["mean"] is not None]))
    if left_out:
        lines.append("left out, a seed diverged: " + ", ".join(left_out))
    lines.append(USE)
    return pick["trial_id"][0].as_py(), _config(pick, run_dir), "\n".join(lines)


def _versus_base(winner: dict[str, Any]) -> str:
    base, mean, se = winner["base"], winner["mean"], winner["se"]
    if base is None:
        return "no base recorded: the improvement is unknown"
    gap = f"base - mean = {base - mean:.2g}"
    if winner["vs_base"] == BEATS_BASE:
        return (f"improvement over the base {base:.4g}: {_gain(base, mean)}, beyond the noise "
                f"({gap} > 2 SE = {2 * se:.2g})")
    why = "one seed: noise unknown" if se is None else f"{gap} <= 2 SE = {2 * se:.2g}"
    return (f"the winner cannot be told apart from the base {base:.4g}: its improvement "
            f"{_gain(base, mean)} is within the noise ({why})")


def _versus_runner_up(winner: dict[str, Any], others: list[dict[str, Any]]) -> str:
    if not others:
        return "no runner-up: no other confirmed configuration completed without divergence"
    second = others[0]  # rows come sorted by mean
    named = f"runner-up {second['config_id']}: {_pm(second['mean'], second['se'], second['n'])}"
    diff = second["mean"] - winner["mean"]
    if winner["se"] is None or second["se"] is None:
        return f"the winner cannot be told apart from the {named} (standard error unknown)"
    bound = 2 * math.sqrt(winner["se"] ** 2 + second["se"] ** 2)
    if second["vs_best"] != LIKE_BEST:  # confirmed() marked it by the noise rule
        return f"{named}: worse beyond the noise (difference {diff:.2g} > 2 x combined SE " \
               f"{bound:.2g})"
    return (f"the winner cannot be told apart from the {named} (difference {diff:.2g} <= "
            f"2 x combined SE {bound:.2g})")


def _unconfirmed(trials: pa.Table, table: pa.Table, run_dir: str | os.PathLike[str],
                 left_out: list[str], pending: list[str]) -> tuple[str, dict[str, Any], str]:
    """No confirmed configuration qualifies: the best completed trial of a configuration that
    diverged in no confirm seed."""
    bad = table.filter(pc.greater(table["diverged"], 0))["config_id"].combine_chunks()
    keep = pc.invert(pc.fill_null(pc.is_in(trials["config_id"], value_set=bad), False))
    row = _lowest(trials.filter(keep), run_dir, trials)
    reasons = ([f"a seed diverged: {', '.join(left_out)}"] if left_out else []) + (
        [f"no completed seed yet: {', '.join(pending)}"] if pending else [])
    why = f"no confirmed configuration qualifies ({'; '.join(reasons)})"
    return row["trial_id"][0].as_py(), _config(row, run_dir), _single(row, run_dir, why)


def _single(row: pa.Table, run_dir: str | os.PathLike[str], why: str) -> str:
    """The header of a single best trial (``row``: one trials row)."""
    trial = row.to_pylist()[0]
    base, val = trial["base_val_loss"], trial["best_val_loss"]
    gain = "" if base is None else f"; improvement over the base {base:.4g}: {_gain(base, val)}"
    lines = [f"best completed trial {trial['trial_id']} of {run_dir}: best val loss "
             f"{val:.6g}{gain}"]
    if why:
        lines.append(why)
    lines += ["it rests on one seed: its noise is unknown; " + CONFIRM_HINT, USE]
    return "\n".join(lines)


def best(run_dir: str | os.PathLike[str], fmt: Literal["yaml", "json"] = "yaml",
         frontier: str | os.PathLike[str] | None = None, margin: float | None = None) -> str:
    """The text ``tune-sana best`` prints."""
    _, config, header = best_config(run_dir, frontier, margin)
    return format_config(config, fmt, header)
