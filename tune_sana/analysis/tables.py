"""The report's tables, computed from loaded runs with pyarrow (``group_by``, joins, sorts; no
Python loop over rows): the ranking, the base, the confirmed configurations (the noise rule
of ``noise``), trials damaged at load, stability counts, divergence and collapse causes,
several runs side by side, a frontier run's stability frontier (``frontier``), and the
sections the report prints in order.

Nulls in grouping keys: ``max_grad_norm`` null (clipping off) becomes ``inf`` (the clip value
that never clips, printed as ``none``) and a null string key (``variant``) becomes ``none``, so
that nulls group and join like any other value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tune_sana.analysis import frontier
from tune_sana.analysis.noise import BEST, CONFIRM_HINT, confirmed, has_confirm
from tune_sana.analysis.runs import Run
from tune_sana.config import Precision
from tune_sana.outcomes import FINISHED, FINITE, INFEASIBLE, Outcome
from tune_sana.record.schema import CONFIG_NAMES

PRECISION_ORDER = [p.value for p in Precision]
UNKNOWN_MODULE = "(not located)"
# Config columns shown first in the ranking, when searched or varying.
LEADING = ("precision", "variant", "attention_fp32", "lr", "warmup_steps", "max_grad_norm")
STABILITY_VALUES = ["trials", "diverged", "collapsed", "pruned", "completed", "error",
                    "best_val"]
_COUNTED = ("diverged", "collapsed", "pruned", "completed", "error")


@dataclass
class Section:
    """One printed table. ``groups`` (label, number of columns) draws a header line above the
    column names, for tables with a block of columns per run dir. ``note``: lines printed in
    parentheses under the table; ``text``: plain sentences under those, one paragraph a
    line."""

    title: str
    table: pa.Table
    note: str = ""
    groups: list[tuple[str, int]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    text: str = ""


# --- tables ----------------------------------------------------------------------------------

def varying_columns(runs: Sequence[Run]) -> list[str]:
    """Config columns searched by a run's spec or taking more than one value (null counts as a
    value) across the finished trials of all runs: LEADING ones first, then TrialConfig's
    order."""
    tables = [r.trials.select(list(CONFIG_NAMES)) for r in runs]
    both = pa.concat_tables(tables) if tables else pa.table({})
    searched = {k for r in runs for k in r.searched}
    out = []
    for name in CONFIG_NAMES:
        if name in searched or (both.num_rows and
                                pc.count_distinct(both[name], mode="all").as_py() > 1):
            out.append(name)
    first = [n for n in LEADING if n in out]
    return first + [n for n in out if n not in first]


def _varies_within_a_run(runs: Sequence[Run], name: str) -> bool:
    return any(r.trials.num_rows and pc.count_distinct(r.trials[name], mode="all").as_py() > 1
               for r in runs)


def ranking(runs: Sequence[Run], columns: Sequence[str], top: int = 10) -> pa.Table:
    """The ``top`` trials by best validation loss (ascending; ties by trial id) among completed,
    pruned and running ones; diverged and errored trials are left out (see ``stability``), and
    so are trials without a best validation loss. Columns: [run,] trial_id, [stage, config_id
    when a run has a confirm stage,] ``columns``, best_val_loss, improvement, [final_retain_loss
    when recorded,] outcome, steps_run, wall_time_s; null ``max_grad_norm`` / ``variant`` as
    inf / ``none``."""
    confirm = any(has_confirm(r.trials) for r in runs)
    retain = any(r.trials["final_retain_loss"].null_count < r.trials.num_rows for r in runs)
    names = ["trial_id", *(("stage", "config_id") if confirm else ()), *columns,
             "best_val_loss", "improvement", *(("final_retain_loss",) if retain else ()),
             "outcome", "steps_run", "wall_time_s"]
    parts = []
    for run in runs:
        done = run.trials.filter(pc.is_in(run.trials["outcome"], pa.array(list(FINITE))))
        done = done.select(names)
        for name in ("max_grad_norm", "variant"):  # null here means off / default: say so
            if name in columns:
                index = done.schema.get_field_index(name)
                done = done.set_column(index, name, _key_columns(done, [name])[name])
        live = run.running
        live_full = pa.table({
            name: (live[name] if name in live.column_names
                   else pa.nulls(live.num_rows, done.schema.field(name).type))
            for name in done.column_names if name != "outcome"
        }).append_column("outcome", pa.array([Outcome.RUNNING.value] * live.num_rows,
                                             pa.string()))
        both = pa.concat_tables([done, live_full.select(done.column_names)],
                                promote_options="permissive")
        if len(runs) > 1:
            both = both.add_column(0, "run", pa.array([run.label] * both.num_rows, pa.string()))
        parts.append(both)
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.filter(pc.is_valid(table["best_val_loss"]))
    return table.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")]).slice(
        0, top)


def _key_columns(trials: pa.Table, by: Sequence[str]) -> pa.Table:
    """Grouping keys without nulls (nulls never join): clip null -> inf, variant null -> none."""
    out = {}
    for name in by:
        column = trials[name]
        if name == "max_grad_norm":
            column = pc.fill_null(column, math.inf)
        elif pa.types.is_string(column.type):
            column = pc.fill_null(column, "none")
        out[name] = column
    return pa.table(out)


def _sort(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Sort by ``keys``, precision in Precision's order (fp32 first), unknown modes last."""
    if "precision" not in keys:
        return table.sort_by([(k, "ascending") for k in keys])
    order = pc.fill_null(pc.index_in(table["precision"],
                                     value_set=pa.array(PRECISION_ORDER)), len(PRECISION_ORDER))
    tmp = table.append_column("_order", order)
    sort = [("_order" if k == "precision" else k, "ascending") for k in keys]
    sort.insert(keys.index("precision") + 1, ("precision", "ascending"))
    return tmp.sort_by(sort).drop_columns(["_order"])


def stability(run: Run, by: Sequence[str]) -> pa.Table:
    """Per group of ``by``: trials, diverged, collapsed, pruned, completed, error (int64 counts
    of finished trials) and best_val (float64: the lowest best validation loss of a completed
    or pruned trial in the group; null if none)."""
    trials = run.trials
    keys = _key_columns(trials, by)
    outcome = trials["outcome"]
    for name in _COUNTED:
        keys = keys.append_column(name, pc.equal(outcome, name).cast(pa.int64()))
    finite = pc.is_in(outcome, pa.array(list(FINITE)))
    keys = keys.append_column("val", pc.if_else(finite, trials["best_val_loss"],
                                                pa.scalar(None, pa.float64())))
    keys = keys.append_column("trial_id", trials["trial_id"])
    agg = keys.group_by(list(by)).aggregate([
        ("trial_id", "count"), *((name, "sum") for name in _COUNTED), ("val", "min")])
    agg = agg.rename_columns({"trial_id_count": "trials", "val_min": "best_val",
                              **{f"{name}_sum": name for name in _COUNTED}})
    return _sort(agg.select([*by, *STABILITY_VALUES]), list(by))


def _group_median(keys: pa.Array | pa.ChunkedArray,
                  values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Exact median of ``values`` per key (nulls dropped): sort, then the middle of each run."""
    table = pa.table({"key": keys, "value": values}).filter(pc.is_valid(values))
    if table.num_rows == 0:
        return pa.table({"key": pa.array([], keys.type), "median": pa.array([], pa.float64())})
    table = table.sort_by([("key", "ascending"), ("value", "ascending")])
    runs = pc.run_end_encode(table["key"].combine_chunks())
    ends = runs.run_ends.to_numpy().astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    size = ends - starts
    vals = table["value"].to_numpy().astype(np.float64)
    median = (vals[starts + (size - 1) // 2] + vals[starts + size // 2]) / 2
    return pa.table({"key": runs.values, "median": pa.array(median)})


def _counts_with_median(diverged: pa.Table, key: str) -> pa.Table:
    """``key``, trials (how many ended with that value), median_step (of their diverged_step),
    most trials first."""
    keys = diverged[key]
    if key == "nonfinite_module":
        keys = pc.fill_null(keys, UNKNOWN_MODULE)
    else:
        keys = pc.fill_null(keys, "unknown")
    counts = pa.table({key: keys}).group_by(key).aggregate([([], "count_all")])
    counts = counts.rename_columns(["trials" if c == "count_all" else c
                                    for c in counts.column_names])
    medians = _group_median(keys, diverged["diverged_step"]).rename_columns(
        [key, "median_step"])
    joined = counts.join(medians, key, join_type="left outer")
    return joined.select([key, "trials", "median_step"]).sort_by(
        [("trials", "descending"), (key, "ascending")])


def divergence_causes(run: Run) -> tuple[pa.Table, pa.Table, float | None]:
    """(counts and median diverged_step by divergence_cause, of diverged and collapsed trials
    (a collapse's cause is ``loss_collapse``); the same by nonfinite_module, of diverged trials
    only (a collapse has no non-finite module); median diverged_step of all diverged and
    collapsed trials or None). Null causes print as ``unknown``; null modules (the check did
    not locate a layer) as ``(not located)``."""
    ended = run.trials.filter(pc.is_in(run.trials["outcome"], pa.array(list(INFEASIBLE))))
    diverged = ended.filter(pc.equal(ended["outcome"], Outcome.DIVERGED.value))
    by_cause = _counts_with_median(ended, "divergence_cause")
    by_module = _counts_with_median(diverged, "nonfinite_module")
    steps = ended["diverged_step"].drop_null()
    median = None
    if len(steps):
        whole = _group_median(pa.array(np.zeros(len(steps), np.int64)), steps)
        median = float(whole["median"][0].as_py())
    return by_cause, by_module, median


def base_losses(run: Run) -> pa.Table:
    """Per precision x variant (null variant as ``none``): trials, base_val and base_retain
    (the means of base_val_loss and base_retain_loss: the untouched model's losses at step 0;
    null where a trial recorded none)."""
    keys = _key_columns(run.trials, ["precision", "variant"])
    keys = keys.append_column("base_val", run.trials["base_val_loss"])
    keys = keys.append_column("base_retain", run.trials["base_retain_loss"])
    agg = keys.group_by(["precision", "variant"]).aggregate([
        ([], "count_all"), ("base_val", "mean"), ("base_retain", "mean")])
    agg = agg.rename_columns({"count_all": "trials", "base_val_mean": "base_val",
                              "base_retain_mean": "base_retain"})
    return _sort(agg.select(["precision", "variant", "trials", "base_val", "base_retain"]),
                 ["precision", "variant"])


def single_base(run: Run) -> float | None:
    """The run's base validation loss when every trial that recorded one prints the same
    (4 significant digits, as the report prints it); None when none did or they differ."""
    values = run.trials["base_val_loss"]
    low, high = pc.min(values).as_py(), pc.max(values).as_py()
    if low is None or f"{low:.4g}" != f"{high:.4g}":
        return None
    return float(pc.mean(values).as_py())


def confirmed_configs(runs: Sequence[Run], columns: Sequence[str]) -> pa.Table:
    """:func:`noise.confirmed` of every run that has a confirm stage, as the report prints
    it: [run,] config_id, ``columns``, seeds, diverged, mean_val, se, improvement,
    search_val, vs_best, vs_base."""
    parts = []
    for run in runs:
        if not has_confirm(run.trials):
            continue
        table = confirmed(run.trials, columns)
        for name in ("max_grad_norm", "variant"):
            if name in columns:
                index = table.schema.get_field_index(name)
                table = table.set_column(index, name, _key_columns(table, [name])[name])
        table = table.select(["config_id", *columns, "seeds", "diverged", "mean", "se",
                              "improvement", "search_val", "vs_best", "vs_base"])
        table = table.rename_columns({"mean": "mean_val"})
        if len(runs) > 1:
            table = table.add_column(0, "run", pa.array([run.label] * table.num_rows,
                                                        pa.string()))
        parts.append(table)
    return pa.concat_tables(parts, promote_options="permissive")


def side_by_side(runs: Sequence[Run], tables: Sequence[pa.Table],
                 keys: Sequence[str]) -> tuple[pa.Table, list[tuple[str, int]]]:
    """Full outer join of one table per run on ``keys``; run i's value columns get the prefix
    ``i:`` (null where run i has no such row). Returns the table and its header groups (run
    label, number of columns)."""
    joined: pa.Table | None = None
    groups = []
    for i, (run, table) in enumerate(zip(runs, tables, strict=True)):
        values = [c for c in table.column_names if c not in keys]
        renamed = table.rename_columns([c if c in keys else f"{i}:{c}"
                                        for c in table.column_names])
        groups.append((run.label, len(values)))
        joined = renamed if joined is None else joined.join(
            renamed, list(keys), join_type="full outer", coalesce_keys=True)
    assert joined is not None
    ordered = list(keys) + [c for c in joined.column_names if c not in keys]
    return _sort(joined.select(ordered), list(keys)), groups


# --- the report's sections -------------------------------------------------------------------

def _stability_sections(runs: Sequence[Run]) -> list[Section]:
    keys = ["precision"]
    if _varies_within_a_run(runs, "variant"):
        keys.append("variant")
    keys.append("lr_decade")
    groupings = [(keys, "Stability by precision" + (" x checkpoint variant" if "variant" in keys
                                                   else "") + " x learning-rate decade"),
                 (["warmup_steps"], "Stability by warmup_steps"),
                 (["max_grad_norm"], "Stability by max_grad_norm (gradient clipping)")]
    if _varies_within_a_run(runs, "attention_fp32"):
        groupings.append((["attention_fp32"], "Stability by attention_fp32"))
    note = ("counts of finished trials; best_val = lowest best validation loss of a completed "
            "or pruned trial")
    running = sum(r.running.num_rows for r in runs)
    if running:
        note += f"; {running} running trial(s) not counted yet"
    sections = []
    for by, title in groupings:
        tables = [stability(r, by) for r in runs]
        if len(runs) == 1:
            sections.append(Section(title, tables[0], note))
        else:
            table, groups = side_by_side(runs, tables, by)
            sections.append(Section(title, table, note, groups,
                                    [*by, *(STABILITY_VALUES * len(runs))]))
    return sections


def _cause_sections(runs: Sequence[Run]) -> list[Section]:
    results = [divergence_causes(r) for r in runs]
    medians = ", ".join(("" if len(runs) == 1 else f"{r.label}: ")
                        + ("-" if m is None else f"{m:g}")
                        for r, (_, _, m) in zip(runs, results, strict=True))
    note = (f"diverged and collapsed trials (loss_collapse: finite, but above collapse_factor "
            f"x base); median step they ended at: {medians}")
    out = []
    for idx, key, title in ((0, "divergence_cause", "Divergence causes"),
                            (1, "nonfinite_module", "First non-finite module (diverged trials)")):
        tables = [res[idx] for res in results]
        if len(runs) == 1:
            out.append(Section(title, tables[0], note if idx == 0 else ""))
        else:
            table, groups = side_by_side(runs, tables, [key])
            table = table.sort_by([(key, "ascending")])
            out.append(Section(title, table, note if idx == 0 else "", groups,
                               [key, *(["trials", "median_step"] * len(runs))]))
    return out


def _overview(runs: Sequence[Run]) -> Section:
    """One column per run: trial counts by outcome, the base, the best completed trial and
    its improvement, and the confirmed best configuration."""
    rows = ["trials", *FINISHED, "running", "base val loss", "damaged at load",
            "best completed val", "best trial", "improvement", "confirmed best"]
    columns: dict[str, list[Any]] = {"": rows}
    for run in runs:
        outcome = run.trials["outcome"]
        counts: list[Any] = [run.trials.num_rows + run.running.num_rows]
        counts += [pc.sum(pc.equal(outcome, o).cast(pa.int64())).as_py() or 0 for o in FINISHED]
        counts.append(run.running.num_rows)
        base = single_base(run)
        recorded = run.trials["base_val_loss"].null_count < run.trials.num_rows
        counts.append(f"{base:.4g}" if base is not None
                      else "varies (see Base)" if recorded else "-")
        counts.append(_damaged_cell(run))
        done = run.trials.filter(pc.and_(pc.equal(outcome, Outcome.COMPLETED.value),
                                         pc.is_valid(run.trials["best_val_loss"])))
        best = done.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")])
        if best.num_rows:
            gain = best["improvement"][0].as_py()
            counts += [f"{best['best_val_loss'][0].as_py():.4g}", best["trial_id"][0].as_py(),
                       "-" if gain is None else f"{100 * gain:.1f}%"]
        else:
            counts += ["-", "-", "-"]
        counts.append(_confirmed_best(run))
        columns[run.label] = [str(c) for c in counts]
    return Section("Runs", pa.table(columns))


def _damaged_cell(run: Run) -> str:
    """The overview's cell: trials flagged damaged_at_load, of those load-checked."""
    flags = run.trials["damaged_at_load"]
    checked = len(flags) - flags.null_count
    if not checked:
        return "-"
    return f"{pc.sum(flags.cast(pa.int64())).as_py() or 0} of {checked} checked"


def damaged_at_load(run: Run) -> pa.Table:
    """The trials flagged damaged_at_load (their precision computes in another dtype than the
    checkpoint's native one, and their step-0 val loss is worse by more than damage_tolerance):
    trial_id, precision, variant (null as ``none``), base_val (in the trial's precision),
    native_base_val (in the checkpoint's), worse (base / native - 1) and outcome; worst
    first."""
    hit = run.trials.filter(pc.fill_null(run.trials["damaged_at_load"], False))
    keys = _key_columns(hit, ["precision", "variant"])
    worse = pc.subtract(pc.divide(hit["base_val_loss"], hit["native_base_val_loss"]), 1.0)
    table = pa.table({"trial_id": hit["trial_id"], "precision": keys["precision"],
                      "variant": keys["variant"], "base_val": hit["base_val_loss"],
                      "native_base_val": hit["native_base_val_loss"], "worse": worse,
                      "outcome": hit["outcome"]})
    return table.sort_by([("worse", "descending"), ("trial_id", "ascending")])


DAMAGED_NOTE = (
    "base_val: step-0 val loss in the trial's precision; native_base_val: the checkpoint in its "
    "own (fp16 weights under fp16 autocast, bf16 under bf16, fp32 in fp32); worse = base_val / "
    "native_base_val - 1, above damage_tolerance. A flag, not an outcome: these trials trained "
    "on from a damaged start (e.g. an FP16 checkpoint that depends on fp16's +-65504 attention "
    "clip, run in fp32 or bf16)")


def _damaged_sections(runs: Sequence[Run]) -> list[Section]:
    """One table per run with trials flagged damaged_at_load; none when no trial was."""
    out = []
    for run in runs:
        table = damaged_at_load(run)
        if table.num_rows:
            title = "Damaged at load" + (f": {run.label}" if len(runs) > 1 else "")
            out.append(Section(title, table, DAMAGED_NOTE))
    return out


def _confirmed_best(run: Run) -> str:
    """The overview's cell: the best confirmed configuration, mean +- SE over n seeds."""
    if not has_confirm(run.trials):
        return "no confirm stage"
    table = confirmed(run.trials)
    best = table.filter(pc.equal(table["vs_best"], BEST))
    if best.num_rows == 0:
        return "none (a seed diverged or collapsed, or none completed)"
    row = best.to_pylist()[0]
    se = "?" if row["se"] is None else f"{row['se']:.2g}"
    return f"{row['config_id']}: {row['mean']:.4g} +- {se} ({row['n']} seeds)"


def _base_sections(runs: Sequence[Run]) -> list[Section]:
    """The base by precision x variant, when some run's trials do not share one base."""
    varies = [r for r in runs if single_base(r) is None
              and r.trials["base_val_loss"].null_count < r.trials.num_rows]
    if not varies:
        return []
    title = "Base (the untouched model at step 0) by precision x checkpoint variant"
    note = "mean base validation and retain loss of the trials in each group"
    tables = [base_losses(r) for r in runs]
    if len(runs) == 1:
        return [Section(title, tables[0], note)]
    table, groups = side_by_side(runs, tables, ["precision", "variant"])
    return [Section(title, table, note, groups,
                    ["precision", "variant", *(["trials", "base_val", "base_retain"]
                                               * len(runs))])]


CONFIRMED_NOTE = (
    "mean_val, se: mean and standard error (sample std / sqrt(n)) of best val loss over the "
    "completed confirm seeds; search_val: the search trial's own value, kept apart (picked "
    "for being low: biased low); vs_best: best = lowest mean that diverged in no seed, ~best = "
    "not distinguishable from it (|difference| <= 2 x combined SE; one seed: SE unknown, "
    "never told apart); vs_base: better = base - mean > 2 SE")


def _confirmed_sections(runs: Sequence[Run], columns: Sequence[str]) -> list[Section]:
    shown = [c for c in columns if c != "seed"]  # replicas differ in seed only
    table = confirmed_configs(runs, shown) if any(has_confirm(r.trials) for r in runs) else None
    if table is None:
        return []
    without = [r.label for r in runs if not has_confirm(r.trials)]
    note = CONFIRMED_NOTE + (f"; no confirm stage in {', '.join(without)}" if without else "")
    return [Section("Confirmed configurations (fresh seeds)", table, note)]


def _single_seed_note(runs: Sequence[Run]) -> str:
    """The ranking's second note line for runs without a confirm stage ('' if none)."""
    without = [r.label for r in runs if not has_confirm(r.trials)]
    if not without:
        return ""
    where = "" if len(without) == len(runs) else f" in {', '.join(without)}"
    return (f"single seed per trial{where}: the ranking's noise is unknown; {CONFIRM_HINT}")


def _frontier_sections(runs: Sequence[Run]) -> list[Section]:
    """The stability frontier of each run that has a frontier.parquet: the table, sorted by
    stable lr, and the sentences (:mod:`frontier`); none for other runs."""
    out = []
    for run in runs:
        table = frontier.read(run.path)
        if table is None:
            continue
        title = "Stability frontier" + (f": {run.label}" if len(runs) > 1 else "")
        words = frontier.sentences(table, frontier.space_of(run.path),
                                   live=run.running.num_rows > 0)
        out.append(Section(title, frontier.frontier_table(table), frontier.TABLE_NOTE,
                           text="\n".join(words)))
    return out


def build_sections(runs: Sequence[Run], top: int = 10) -> list[Section]:
    """Every table of the report, in print order (a frontier run's frontier right after the
    overview)."""
    columns = varying_columns(runs)
    rank = ranking(runs, columns, top)
    sections = [_overview(runs), *_frontier_sections(runs), *_base_sections(runs),
                *_damaged_sections(runs)]
    note = ("completed, pruned and running trials; diverged, collapsed and errored ones are in "
            "the stability tables; config columns: the ones searched or varying; improvement = "
            "1 - best val / base val")
    single = _single_seed_note(runs)
    sections.append(Section(f"Top {min(top, rank.num_rows)} trials by best validation loss",
                            rank, note + (f"\n{single}" if single else "")))
    sections += _confirmed_sections(runs, columns)
    sections += _stability_sections(runs)
    sections += _cause_sections(runs)
    return sections
