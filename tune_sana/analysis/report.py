"""Tables and rankings from a sweep's Parquet record: where is it safe, and what is best?

Everything here reads ``trials.parquet`` and ``history/`` with pyarrow (column projection, a
trial filter pushed into the scan, ``group_by`` for counts); nothing imports Ray, and no Python
loop runs over rows. A sweep that is still running works: its unfinished trials come from the
history alone (outcome ``running``, no config yet).

Config values that trials.parquet leaves null (settings the sweep fixed rather than searched)
are filled from the run's ``sweep.yaml`` and then from TrialConfig's defaults, so every trial
carries its effective settings. ``max_grad_norm`` null (clipping off) becomes ``inf`` in the
tables (the clip value that never clips) and prints as ``none``; a null ``variant`` prints as
``none``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from tune_sana.config import Precision, TrialConfig, UserError
from tune_sana.outcomes import Outcome
from tune_sana.record.readers import read_history, read_metadata, read_trials
from tune_sana.record.schema import CONFIG_FIELDS, SPEC_FILE, TRIALS_FILE, TRIALS_SCHEMA
from tune_sana.record.storage import Location, is_uri

CONFIG_NAMES: tuple[str, ...] = tuple(f.name for f in CONFIG_FIELDS)
SUMMARY_COLUMNS = ["outcome", "divergence_cause", "diverged_step", "nonfinite_module",
                   "best_val_loss", "steps_run", "wall_time_s"]
FINISHED = tuple(o.value for o in Outcome if o is not Outcome.RUNNING)
# Outcomes whose best validation loss counts as a setting's result (a diverged trial's early
# values do not: the setting blew up).
FINITE = (Outcome.COMPLETED.value, Outcome.PRUNED.value)
PRECISION_ORDER = [p.value for p in Precision]
UNKNOWN_MODULE = "(not located)"
# Config columns shown first in the ranking, when searched or varying.
LEADING = ("precision", "variant", "attention_fp32", "lr", "warmup_steps", "max_grad_norm")


@dataclass(frozen=True)
class Run:
    """One run directory, read: finished trials with their effective config, and running ones.

    ``trials``: trial_id, every config column, and SUMMARY_COLUMNS (plus ``lr_decade``, int64
    floor(log10(lr))), one row per finished trial. ``running``: trial_id, best_val_loss,
    steps_run, wall_time_s for trials seen in history/ but not yet in trials.parquet.
    ``searched``: the config keys the run's spec searched (empty if no spec was found).
    """

    label: str
    path: Path | str
    trials: pa.Table
    running: pa.Table
    searched: tuple[str, ...] = ()


@dataclass
class Section:
    """One printed table. ``groups`` (label, number of columns) draws a header line above the
    column names, for tables with a block of columns per run dir."""

    title: str
    table: pa.Table
    note: str = ""
    groups: list[tuple[str, int]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------

def read_spec(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The run's spec: sweep.yaml, else the spec stored in trials.parquet's metadata."""
    text = ""
    folder = Location.of(run_dir)
    spec_file = folder / SPEC_FILE
    if spec_file.is_file():
        text = spec_file.read_text()
    elif (folder / TRIALS_FILE).is_file():
        text = read_metadata(folder / TRIALS_FILE).get("tune_sana.spec", "")
    try:
        spec = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        raise UserError(f"{spec_file}: malformed YAML; restore the file the sweep wrote") from None
    return spec if isinstance(spec, dict) else {}


def _fill_config(trials: pa.Table, fixed: Mapping[str, Any], searched: set[str]) -> pa.Table:
    """Fill null config cells of keys the spec did not search: the fixed value, else the
    TrialConfig default. A searched key keeps its nulls (``max_grad_norm: null`` was chosen)."""
    for name in CONFIG_NAMES:
        if name in searched:
            continue
        value = fixed.get(name, TrialConfig.model_fields[name].default)
        if value is None:
            continue
        index = trials.schema.get_field_index(name)
        column = trials.column(index)
        value = getattr(value, "value", value)
        try:
            fill = pa.scalar(str(value) if pa.types.is_string(column.type) else value,
                             type=column.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            continue
        trials = trials.set_column(index, name, pc.fill_null(column, fill))
    return trials


def lr_decade(lr: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """floor(log10(lr)) as int64 (1e-4 and 9.9e-4 -> -4); the 1e-9 absorbs log10 rounding."""
    decade: pa.Array | pa.ChunkedArray = pc.floor(pc.add(pc.log10(lr), 1e-9)).cast(pa.int64())
    return decade


def _running(run_dir: str | os.PathLike[str] | Location,
             finished: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Trials in history/ that are not in trials.parquet yet, summarised from their rows."""
    ids = read_history(run_dir, columns=["trial_id"]).column(0).unique()
    done = finished.combine_chunks() if isinstance(finished, pa.ChunkedArray) else finished
    running = ids.filter(pc.invert(pc.is_in(ids, value_set=done)))
    empty = pa.table({"trial_id": pa.array([], pa.string()),
                      "best_val_loss": pa.array([], pa.float64()),
                      "steps_run": pa.array([], pa.int64()),
                      "wall_time_s": pa.array([], pa.float64())})
    if len(running) == 0:
        return empty
    hist = read_history(run_dir, columns=["trial_id", "step", "val_loss", "timestamp"],
                        trial_ids=running.to_pylist())
    agg = hist.group_by("trial_id").aggregate([
        ("val_loss", "min"), ("step", "max"), ("timestamp", "min"), ("timestamp", "max")])
    return pa.table({
        "trial_id": agg["trial_id"],
        "best_val_loss": agg["val_loss_min"],
        "steps_run": pc.add(agg["step_max"], 1),
        "wall_time_s": pc.subtract(agg["timestamp_max"], agg["timestamp_min"]),
    }).sort_by("trial_id")


def run_label(path: Path | PurePath, others: Sequence[Path | PurePath] = ()) -> str:
    """The folder name, or parent/name where two run dirs share a name."""
    if sum(p.name == path.name for p in others) > 1:
        return f"{path.parent.name}/{path.name}"
    return path.name


def read_trial_columns(run_dir: str | os.PathLike[str] | Location,
                       columns: Sequence[str]) -> pa.Table:
    """``columns`` of trials.parquet, read with projection. A column the file lacks (written
    before a TrialConfig field or summary column existed) comes back as nulls of its
    TRIALS_SCHEMA type, so files of older versions still read."""
    folder = Location.of(run_dir)
    path = folder / TRIALS_FILE
    present = set(path.read_schema().names) if path.is_file() else set(TRIALS_SCHEMA.names)
    table = read_trials(folder, [c for c in columns if c in present])
    for name in columns:
        if name not in present:
            table = table.append_column(
                TRIALS_SCHEMA.field(name), pa.nulls(table.num_rows, TRIALS_SCHEMA.field(name).type))
    return table.select(list(columns))


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> Run:
    """Read one run dir, a local folder or a URI (UserError if it is not one). Works while the
    sweep runs."""
    path = Location.of(run_dir)
    trials = read_trial_columns(path, ["trial_id", *CONFIG_NAMES, *SUMMARY_COLUMNS])
    spec = read_spec(path)
    fixed = spec.get("fixed") if isinstance(spec.get("fixed"), dict) else {}
    space = spec.get("space") if isinstance(spec.get("space"), dict) else {}
    trials = _fill_config(trials, fixed or {}, set(space or {}))
    trials = trials.append_column("lr_decade", lr_decade(trials["lr"]))
    running = _running(path, trials["trial_id"])
    return Run(label or path.name, path.public(), trials, running,
               tuple(k for k in CONFIG_NAMES if k in (space or {})))


def load_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> list[Run]:
    paths: list[Path | str] = [str(p) if is_uri(p) else Path(p) for p in run_dirs]
    # Local folders resolved (symlinks, ..); a URI by the path on its filesystem.
    resolved: list[Path | PurePath] = [
        PurePosixPath(Location.of(p).path) if isinstance(p, str) else p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise UserError(f"{paths[i]}: run dir given twice; pass each run dir once")
    return [load_run(p, run_label(r, resolved)) for p, r in zip(paths, resolved, strict=True)]


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


# --- tables ----------------------------------------------------------------------------------

def ranking(runs: Sequence[Run], columns: Sequence[str], top: int = 10) -> pa.Table:
    """The ``top`` trials by best validation loss (ascending; ties by trial id) among completed,
    pruned and running ones; diverged and errored trials are left out (see ``stability``).
    Columns: [run,] trial_id, ``columns``, best_val_loss, outcome, steps_run, wall_time_s."""
    parts = []
    for run in runs:
        done = run.trials.filter(pc.is_in(run.trials["outcome"], pa.array(list(FINITE))))
        done = done.select(["trial_id", *columns, "best_val_loss", "outcome", "steps_run",
                            "wall_time_s"])
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
    if "precision" in keys:
        sort.insert(keys.index("precision") + 1, ("precision", "ascending"))
    return tmp.sort_by(sort).drop_columns(["_order"])


STABILITY_VALUES = ["trials", "diverged", "pruned", "completed", "error", "best_val"]


def stability(run: Run, by: Sequence[str]) -> pa.Table:
    """Per group of ``by``: trials, diverged, pruned, completed, error (int64 counts of finished
    trials) and best_val (float64: the lowest best validation loss of a completed or pruned
    trial in the group; null if none)."""
    trials = run.trials
    keys = _key_columns(trials, by)
    outcome = trials["outcome"]
    for name in ("diverged", "pruned", "completed", "error"):
        keys = keys.append_column(name, pc.equal(outcome, name).cast(pa.int64()))
    finite = pc.is_in(outcome, pa.array(list(FINITE)))
    keys = keys.append_column("val", pc.if_else(finite, trials["best_val_loss"],
                                                pa.scalar(None, pa.float64())))
    keys = keys.append_column("trial_id", trials["trial_id"])
    agg = keys.group_by(list(by)).aggregate([
        ("trial_id", "count"), ("diverged", "sum"), ("pruned", "sum"), ("completed", "sum"),
        ("error", "sum"), ("val", "min")])
    agg = agg.rename_columns({"trial_id_count": "trials", "diverged_sum": "diverged",
                              "pruned_sum": "pruned", "completed_sum": "completed",
                              "error_sum": "error", "val_min": "best_val"})
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
    keys = diverged[key]
    if key == "nonfinite_module":
        keys = pc.fill_null(keys, UNKNOWN_MODULE)
    else:
        keys = pc.fill_null(keys, "unknown")
    counts = pa.table({key: keys}).group_by(key).aggregate([([], "count_all")])
    counts = counts.rename_columns(["diverged" if c == "count_all" else c
                                    for c in counts.column_names])
    medians = _group_median(keys, diverged["diverged_step"]).rename_columns(
        [key, "median_step"])
    joined = counts.join(medians, key, join_type="left outer")
    return joined.select([key, "diverged", "median_step"]).sort_by(
        [("diverged", "descending"), (key, "ascending")])


def divergence_causes(run: Run) -> tuple[pa.Table, pa.Table, float | None]:
    """(counts and median diverged_step by divergence_cause, the same by nonfinite_module,
    median diverged_step of all diverged trials or None). Null causes print as ``unknown``;
    null modules (the check did not locate a layer) as ``(not located)``."""
    diverged = run.trials.filter(pc.equal(run.trials["outcome"], Outcome.DIVERGED.value))
    by_cause = _counts_with_median(diverged, "divergence_cause")
    by_module = _counts_with_median(diverged, "nonfinite_module")
    steps = diverged["diverged_step"].drop_null()
    median = None
    if len(steps):
        whole = _group_median(pa.array(np.zeros(len(steps), np.int64)), steps)
        median = float(whole["median"][0].as_py())
    return by_cause, by_module, median


def side_by_side(runs: Sequence[Run], tables: Sequence[pa.Table],
                 keys: Sequence[str]) -> tuple[pa.Table, list[tuple[str, int]]]:
    """Full outer join of one table per run on ``keys``; run i's value columns get the prefix
    ``i:``. Returns the table and its header groups (run label, number of columns)."""
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


# --- the report ------------------------------------------------------------------------------

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
    note = f"median diverged step: {medians}"
    out = []
    for idx, key, title in ((0, "divergence_cause", "Divergence causes"),
                            (1, "nonfinite_module", "First non-finite module")):
        tables = [res[idx] for res in results]
        if len(runs) == 1:
            out.append(Section(title, tables[0], note if idx == 0 else ""))
        else:
            table, groups = side_by_side(runs, tables, [key])
            table = table.sort_by([(key, "ascending")])
            out.append(Section(title, table, note if idx == 0 else "", groups,
                               [key, *(["diverged", "median_step"] * len(runs))]))
    return out


def _overview(runs: Sequence[Run]) -> Section:
    """One column per run: trial counts by outcome and the best completed trial."""
    rows = ["trials", *FINISHED, "running", "best completed val", "best trial"]
    columns: dict[str, list[Any]] = {"": rows}
    for run in runs:
        outcome = run.trials["outcome"]
        counts = [run.trials.num_rows + run.running.num_rows]
        counts += [pc.sum(pc.equal(outcome, o).cast(pa.int64())).as_py() or 0 for o in FINISHED]
        counts.append(run.running.num_rows)
        done = run.trials.filter(pc.and_(pc.equal(outcome, Outcome.COMPLETED.value),
                                         pc.is_valid(run.trials["best_val_loss"])))
        best = done.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")])
        if best.num_rows:
            counts += [f"{best['best_val_loss'][0].as_py():.4g}", best["trial_id"][0].as_py()]
        else:
            counts += ["-", "-"]
        columns[run.label] = [str(c) for c in counts]
    return Section("Runs", pa.table(columns))


def build_sections(runs: Sequence[Run], top: int = 10) -> list[Section]:
    """Every table of the report, in print order."""
    columns = varying_columns(runs)
    rank = ranking(runs, columns, top)
    sections = [_overview(runs)]
    sections.append(Section(
        f"Top {min(top, rank.num_rows)} trials by best validation loss", rank,
        "completed, pruned and running trials; diverged and errored ones are in the "
        "stability tables; config columns: the ones searched or varying"))
    sections += _stability_sections(runs)
    sections += _cause_sections(runs)
    return sections


# --- rendering -------------------------------------------------------------------------------

def _formatter(name: str) -> Callable[[Any], str]:
    base = name.split(":", 1)[-1]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if base == "lr_decade":
            return f"1e{value}..1e{value + 1}"
        if base == "max_grad_norm" and value == math.inf:
            return "none"
        if base == "lr":
            return f"{value:.2e}"
        if base in ("wall_time_s", "median_step"):
            return f"{value:.1f}" if base == "wall_time_s" else f"{value:g}"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)
    return fmt


def cells(table: pa.Table) -> list[list[str]]:
    """Every cell as display text, column by column (one to_pylist per column)."""
    return [[_formatter(name)(v) for v in table.column(name).to_pylist()]
            for name in table.column_names]


def _headers(section: Section) -> list[str]:
    if section.headers:
        return section.headers
    return [n.split(":", 1)[-1] for n in section.table.column_names]


def _join_line(values: Sequence[str], widths: Sequence[int], numeric: Sequence[bool],
               spans: Sequence[int], align_numbers: bool = True) -> str:
    """One text row: numbers right-aligned; ``spans`` (key columns, then one per run) are
    separated by ' | '."""
    out = [v.rjust(w) if align_numbers and n else v.ljust(w)
           for v, w, n in zip(values, widths, numeric, strict=True)]
    chunks, start = [], 0
    for n in spans:
        chunks.append("  ".join(out[start:start + n]))
        start += n
    return " | ".join(chunks).rstrip()


def _text_block(section: Section) -> str:
    cols = cells(section.table)
    heads = _headers(section)
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(heads, cols, strict=True)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t)
               for t in section.table.schema.types]
    nkeys = len(heads) - sum(n for _, n in section.groups)
    spans = [nkeys, *(n for _, n in section.groups)] if section.groups else [len(heads)]
    lines = [section.title, "=" * len(section.title)]
    if section.groups:
        labels, start = ["  ".join(" " * w for w in widths[:nkeys])], nkeys
        for label, n in section.groups:
            span = sum(widths[start:start + n]) + 2 * (n - 1)
            labels.append(f"{label[:span]:<{span}}")
            start += n
        lines.append(" | ".join(labels).rstrip())
    lines.append(_join_line(heads, widths, numeric, spans))
    lines.append(_join_line(["-" * w for w in widths], widths, numeric, spans, False))
    if section.table.num_rows == 0:
        lines.append("(none)")
    for r in range(section.table.num_rows):
        lines.append(_join_line([col[r] for col in cols], widths, numeric, spans))
    if section.note:
        lines.append(f"({section.note})")
    return "\n".join(lines)


def render_text(sections: Sequence[Section]) -> str:
    """Plain-text tables (numbers right-aligned), one block per section."""
    return "\n\n".join(_text_block(s) for s in sections) + "\n"


def render_html(sections: Sequence[Section], images: Mapping[str, bytes],
                title: str = "tune-sana report") -> str:
    """One self-contained page: every table, then every PNG inlined as base64."""
    import base64

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;margin:2em}"
             "table{border-collapse:collapse;margin-bottom:.5em}"
             "td,th{border:1px solid #ccc;padding:2px 8px}td.n{text-align:right}"
             "p.note{color:#555;font-size:90%}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><table>")
        if section.groups:
            nkeys = len(_headers(section)) - sum(n for _, n in section.groups)
            parts.append("<tr>" + (f"<th colspan={nkeys}></th>" if nkeys else "")
                         + "".join(f"<th colspan={n}>{html.escape(label)}</th>"
                                   for label, n in section.groups) + "</tr>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in _headers(section))
                     + "</tr>")
        numeric = [pa.types.is_integer(t) or pa.types.is_floating(t)
                   for t in section.table.schema.types]
        cols = cells(section.table)
        for r in range(section.table.num_rows):
            parts.append("<tr>" + "".join(
                f"<td{' class=n' if numeric[i] else ''}>{html.escape(col[r])}</td>"
                for i, col in enumerate(cols)) + "</tr>")
        parts.append("</table>")
        if section.note:
            parts.append(f"<p class=note>{html.escape(section.note)}</p>")
    for name, png in images.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dirs: Sequence[str | os.PathLike[str]], top: int = 10,
           plots_dir: str | os.PathLike[str] | None = None,
           html_file: str | os.PathLike[str] | None = None) -> str:
    """The text report of one or more run dirs; writes PNGs to ``plots_dir`` and one HTML page
    to ``html_file`` when given. matplotlib is imported only then."""
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    runs = load_runs(run_dirs)
    sections = build_sections(runs, top)
    text = render_text(sections)
    if plots_dir is not None or html_file is not None:
        from tune_sana.analysis import plots

        images = plots.render_pngs(runs, top=min(top, 8))
        if plots_dir is not None:
            written = plots.save_pngs(images, Path(plots_dir))
            text += "\nplots: " + ", ".join(str(p) for p in written) + "\n"
        if html_file is not None:
            page = render_html(sections, images,
                               "tune-sana report: " + ", ".join(r.label for r in runs))
            target = Path(html_file)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(page)
            except OSError as err:
                raise UserError(f"--html {html_file}: cannot write ({err.strerror})") from None
            text += f"html: {target}\n"
    return text
