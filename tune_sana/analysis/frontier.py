"""The stability frontier of a frontier run (``search.algorithm: frontier``), read from its
frontier.parquet: the table and plain sentences of the report, and the lr limit that
``tune-sana best --frontier RUN --margin X`` puts on another run's trials.

frontier.parquet holds one row per combination of the searched categorical settings (columns:
record/schema.py FRONTIER_SCHEMA). Its verdicts, in words:

- bracketed: "stable up to 3.1e-4; diverges from 3.9e-4 in <module> (2 of 2 seeds)";
- stable_to_upper: "stable up to the upper bound 1e-1 in 2 of 2 seeds";
- unstable_at_lower: "diverges already at the lower bound 1e-5 ... (2 of 2 seeds)";
- searching: "not settled: the trial budget ran out" (or "the search is still running"), with
  the bracket known so far;
- error: "no verdict: a probe failed (<message>)".

The table is sorted by stable lr, lowest first: combinations with no stable lr (unstable at the
lower bound, or nothing stable seen yet) first, errors last. Sentences come one line per value
of the first categorical key (in the space's order, precision in a precision frontier): the
first combination of the line is named in full ("fp16-amp on fp16 weights: ..."), the others by
how they differ from it ("With attention_fp32: ...").

Matching a trial of another run to a combination: every key of the combination's combo_json
equals the trial's effective value (a TrialConfig key from its column, filled from the run's
fixed settings; any other key from config_json or the fixed settings), compared as canonical
JSON (1.0 == 1, null == null, true != 1).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tune_sana.outcomes import Verdict
from tune_sana.record.readers import read_frontier, read_spec
from tune_sana.record.schema import CONFIG_NAMES

TABLE_COLUMNS = ["setting", "verdict", "stable_lr", "diverged_lr", "ratio", "stable_seeds",
                 "diverged", "cause", "nonfinite_module", "trials", "trial_steps"]
TABLE_NOTE = (
    "sorted by stable_lr, lowest first; stable_lr: the largest lr finite in every seed run "
    "there (stable_seeds of them); diverged_lr: the smallest lr above it that diverged in any "
    "seed; diverged: seeds that diverged there, of those run; ratio = diverged_lr / stable_lr; "
    "cause and nonfinite_module: of the first seed that diverged at diverged_lr; trials, "
    "trial_steps: what the search spent on the combination")
NO_SETTING = "(all trials)"  # the label of a space without categorical keys
# Verdicts whose stable_lr may bound another run's lr (an error's values are not trusted).
WITH_STABLE_LR = (Verdict.BRACKETED.value, Verdict.STABLE_TO_UPPER.value,
                  Verdict.SEARCHING.value)


# --- numbers ---------------------------------------------------------------------------------

def fmt_lr(value: float, digits: int = 2) -> str:
    """An lr as short scientific notation: 3.1e-4, 1e-1 (``digits`` significant digits,
    trailing zeros dropped)."""
    mantissa, exponent = f"{value:.{max(digits, 1) - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt_lrs(*values: float | None) -> list[str]:
    """Several lrs with as few significant digits (2 to 6) as tell the known ones apart."""
    known = {v for v in values if v is not None}
    for digits in range(2, 7):
        shown = {fmt_lr(v, digits) for v in known}
        if len(shown) == len(known):
            break
    return ["-" if v is None else fmt_lr(v, digits) for v in values]


# --- reading ---------------------------------------------------------------------------------

def read(run_dir: str | os.PathLike[str]) -> pa.Table | None:
    """The run's frontier.parquet (None for a run without one)."""
    return read_frontier(run_dir)


def combo(row: Mapping[str, Any]) -> dict[str, Any]:
    """The {key: value} of a frontier row's combination."""
    value = json.loads(row.get("combo_json") or "{}")
    return value if isinstance(value, dict) else {}


def sort_frontier(frontier: pa.Table) -> pa.Table:
    """Rows by stable_lr, lowest first: no stable lr first, verdict error last; ties by
    label."""
    order = pc.fill_null(frontier["stable_lr"], -math.inf)
    order = pc.if_else(pc.equal(frontier["verdict"], Verdict.ERROR.value), math.inf, order)
    tmp = frontier.append_column("_order", order)
    return tmp.sort_by([("_order", "ascending"), ("label", "ascending")]).drop_columns(
        ["_order"])


def frontier_table(frontier: pa.Table) -> pa.Table:
    """The report's table (TABLE_COLUMNS), sorted as :func:`sort_frontier`. ``diverged``
    reads "2 of 2" (seeds diverged at diverged_lr, of those run there)."""
    rows = sort_frontier(frontier)
    label = rows["label"]
    diverged = pc.binary_join_element_wise(rows["diverged_count"].cast(pa.string()),
                                           rows["diverged_seeds"].cast(pa.string()), " of ")
    return pa.table({
        "setting": pc.if_else(pc.equal(label, ""), NO_SETTING, label),
        "verdict": rows["verdict"],
        "stable_lr": rows["stable_lr"],
        "diverged_lr": rows["diverged_lr"],
        "ratio": rows["ratio"],
        "stable_seeds": rows["stable_seeds"],
        "diverged": diverged,
        "cause": rows["divergence_cause"],
        "nonfinite_module": rows["nonfinite_module"],
        "trials": rows["trials"],
        "trial_steps": rows["trial_steps"],
    })


# --- sentences -------------------------------------------------------------------------------

def _seeds(count: int | None, seeds: int | None) -> str:
    if seeds is None:
        return "seeds unknown"
    return f"{count if count is not None else '?'} of {seeds} seed{'s' if seeds != 1 else ''}"


def _where(row: Mapping[str, Any]) -> str:
    """' in <module> (2 of 2 seeds)', or ' (<cause>, 2 of 2 seeds)' where no module was
    located."""
    seeds = _seeds(row["diverged_count"], row["diverged_seeds"])
    if row["nonfinite_module"]:
        return f" in {row['nonfinite_module']} ({seeds})"
    if row["divergence_cause"]:
        return f" ({row['divergence_cause']}, {seeds})"
    return f" ({seeds})"


def verdict_text(row: Mapping[str, Any], live: bool = False) -> str:
    """What a frontier row says, in words (no subject, no final stop). ``live``: the run
    still has running trials, so a searching row is not finished."""
    verdict = row["verdict"]
    stable, diverged = fmt_lrs(row["stable_lr"], row["diverged_lr"])
    if verdict == Verdict.BRACKETED.value:
        return f"stable up to {stable}; diverges from {diverged}{_where(row)}"
    if verdict == Verdict.STABLE_TO_UPPER.value:
        bound = row["lr_high"] if row["lr_high"] is not None else row["stable_lr"]
        return (f"stable up to the upper bound {fmt_lr(bound)} in "
                f"{_seeds(row['stable_seeds'], row['stable_seeds'])}")
    if verdict == Verdict.UNSTABLE_AT_LOWER.value:
        bound = row["lr_low"] if row["lr_low"] is not None else row["diverged_lr"]
        return f"diverges already at the lower bound {fmt_lr(bound)}{_where(row)}"
    if verdict == Verdict.SEARCHING.value:
        why = ("not settled yet: the search is still running" if live
               else "not settled: the trial budget ran out")
        known = []
        known.append(f"stable up to {stable}" if row["stable_lr"] is not None
                     else "no stable lr found yet")
        known.append(f"diverges from {diverged}{_where(row)}" if row["diverged_lr"] is not None
                     else "no divergence seen yet")
        return f"{why}; bracket so far: {', '.join(known)}"
    if verdict == Verdict.ERROR.value:
        message = (row["error"] or "no message recorded").strip().splitlines()
        text = message[0] if message else "no message recorded"
        return f"no verdict: a probe failed ({text[:200]})"
    return f"verdict {verdict!r} (unknown to this version)"


def _canonical(value: Any) -> str:
    """Canonical JSON of one setting's value (1.0 and 1 alike; enums by their value)."""
    value = getattr(value, "value", value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def phrase(key: str, value: Any) -> str:
    """One setting in words: 'fp16-amp', 'on fp16 weights', 'with attention_fp32', 'without
    clipping', 'warmup_steps 20'."""
    if key == "precision":
        return str(value)
    if key == "variant":
        return "on default weights" if value is None else f"on {value} weights"
    if key == "max_grad_norm" and (value is None or value == math.inf):
        return "without clipping"
    if isinstance(value, bool):
        return f"with {key}" if value else f"without {key}"
    shown = "null" if value is None else _canonical(value).strip('"')
    return f"{key} {shown}"


def _subject(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A combination in full: 'fp16-amp on fp16 weights, with attention_fp32'."""
    if not keys:
        return "All trials"
    out = ""
    for key in keys:
        part = phrase(key, values.get(key))
        out = part if not out else f"{out} {part}" if part.startswith("on ") else f"{out}, {part}"
    return out[0].upper() + out[1:] if _prepositional(out) else out


def _prepositional(text: str) -> bool:
    """Whether a phrase starts with 'with', 'without' or 'on' (capitalised at a sentence's
    start; other phrases get 'with' in front in a clause)."""
    return text.split(" ", 1)[0] in ("with", "without", "on")


def _clause(values: Mapping[str, Any], base: Mapping[str, Any], keys: Sequence[str]) -> str:
    """How a combination differs from its line's first: 'With attention_fp32', 'On bf16
    weights and without clipping'."""
    parts = []
    for key in keys:
        if _canonical(values.get(key)) != _canonical(base.get(key)):
            part = phrase(key, values.get(key))
            parts.append(part if _prepositional(part) else f"with {part}")
    text = " and ".join(parts) or "the same settings"
    return text[0].upper() + text[1:]


def _key_order(frontier_rows: Sequence[Mapping[str, Any]],
               space: Mapping[str, Any]) -> list[str]:
    """The combinations' keys in the space's order (others after, sorted)."""
    keys: set[str] = set()
    for row in frontier_rows:
        keys |= set(combo(row))
    return [k for k in space if k in keys] + sorted(keys - set(space))


def _value_rank(space: Mapping[str, Any], key: str, value: Any) -> tuple[int, str]:
    """Where ``value`` stands among the key's choices in the space (unknown ones after)."""
    dim = space.get(key)
    choices: list[Any] = []
    if isinstance(dim, Mapping):
        for kind in ("choice", "grid"):
            if isinstance(dim.get(kind), list):
                choices = dim[kind]
    canon = [_canonical(c) for c in choices]
    text = _canonical(value)
    return (canon.index(text), text) if text in canon else (len(canon), text)


def in_space_order(frontier: pa.Table, space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The frontier's rows (one per combination: a handful) ordered by their values in the
    space's order of keys and of each key's choices (ties by label)."""
    rows = frontier.to_pylist()
    keys = _key_order(rows, space)

    def rank(row: Mapping[str, Any]) -> list[tuple[int, str]]:
        values = combo(row)
        return [_value_rank(space, k, values.get(k)) for k in keys]

    return sorted(rows, key=lambda r: (rank(r), r["label"]))


def sentences(frontier: pa.Table, space: Mapping[str, Any] | None = None,
              live: bool = False) -> list[str]:
    """The frontier in words: one line per value of the first categorical key (in the space's
    order), e.g. "fp16-amp on fp16 weights: stable up to 3.1e-4; diverges from 3.9e-4 in
    transformer_blocks.1.attn1 (2 of 2 seeds). With attention_fp32: stable up to 2.4e-2."
    ``space``: the frontier run's ``space:`` block (for the order; sorted keys without it)."""
    space = space or {}
    rows = in_space_order(frontier, space)
    keys = _key_order(rows, space)
    lines: list[str] = []
    group: list[Mapping[str, Any]] = []

    def flush() -> None:
        if not group:
            return
        base = combo(group[0])
        parts = [f"{_subject(base, keys)}: {verdict_text(group[0], live)}."]
        parts += [f"{_clause(combo(r), base, keys)}: {verdict_text(r, live)}." for r in group[1:]]
        lines.append(" ".join(parts))
        group.clear()

    for row in rows:
        if group and keys and (_canonical(combo(row).get(keys[0]))
                               != _canonical(combo(group[0]).get(keys[0]))):
            flush()
        group.append(row)
    flush()
    return lines


def space_of(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``space:`` block (empty when the run has no spec)."""
    space = read_spec(run_dir).get("space")
    return dict(space) if isinstance(space, Mapping) else {}


# --- another run's trials against the frontier ----------------------------------------------

def _values(trials: pa.Table, key: str, fixed: Mapping[str, Any],
            extras: list[dict[str, Any]] | None) -> list[str | None]:
    """Canonical values of a key that is not a TrialConfig column, per trial (None: the trial
    has no value for it): from config_json, else the run's fixed settings."""
    out: list[str | None] = []
    for extra in extras or [{}] * trials.num_rows:
        if key in extra:
            out.append(_canonical(extra[key]))
        elif key in fixed:
            out.append(_canonical(fixed[key]))
        else:
            out.append(None)
    return out


def _extras(trials: pa.Table) -> list[dict[str, Any]] | None:
    """config_json of every trial, parsed (None when ``trials`` has no such column)."""
    if "config_json" not in trials.column_names:
        return None
    out = []
    for text in trials["config_json"].to_pylist():
        value = json.loads(text) if text else {}
        out.append(value if isinstance(value, dict) else {})
    return out


def _match(trials: pa.Table, values: Mapping[str, Any], fixed: Mapping[str, Any],
           extras: list[dict[str, Any]] | None) -> np.ndarray:
    """Which trials ran with every setting of ``values`` (bool per trial)."""
    mask = np.ones(trials.num_rows, bool)
    for key, value in values.items():
        if key in CONFIG_NAMES and key in trials.column_names:
            column = trials[key]
            try:
                equal = (pc.is_null(column) if value is None
                         else pc.fill_null(pc.equal(column, pa.scalar(value, column.type)),
                                           False))
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError,
                    OverflowError, TypeError):
                equal = pa.array(np.zeros(trials.num_rows, bool))
            mask &= np.asarray(equal.to_numpy(zero_copy_only=False), bool)
        else:
            got = _values(trials, key, fixed, extras)
            want = _canonical(value)
            mask &= np.array([g == want for g in got], bool)
    return mask


# Why a trial was left out by a margin, in the order the one-line account lists them.
ABOVE, NO_COMBO, UNSTABLE, UNSETTLED, ERROR, NO_LR = (
    "with lr above the margin", "with no matching combination in the frontier",
    "whose combination is unstable at the lower bound",
    "whose combination has no stable lr yet (searching)",
    "whose combination has no verdict (error)", "with no lr recorded")
REASONS = (ABOVE, NO_COMBO, UNSTABLE, UNSETTLED, ERROR, NO_LR)


def within_margin(trials: pa.Table, frontier: pa.Table, margin: float,
                  fixed: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """(keep: bool per trial, {reason: trials left out}) of ``trials`` (effective configs of
    another run, with config_json when it has one) against ``frontier``: a trial is kept when
    its combination (the first frontier row whose combo_json it matches) has a stable_lr and a
    verdict other than error, and its lr is at most ``margin`` x that stable_lr. ``fixed``:
    that run's fixed settings (values of keys that are not TrialConfig columns)."""
    fixed = fixed or {}
    n = trials.num_rows
    extras = _extras(trials)
    found = np.zeros(n, bool)
    limit = np.full(n, np.nan)
    lr = np.full(n, np.nan)
    why = np.full(n, "", object)
    for row in frontier.to_pylist():  # one per combination
        mine = _match(trials, combo(row), fixed, extras) & ~found
        if not mine.any():
            continue
        found |= mine
        lr_key = row["lr_key"] or "lr"
        if lr_key in CONFIG_NAMES and lr_key in trials.column_names:
            column = trials[lr_key].cast(pa.float64())
            lr[mine] = np.asarray(pc.fill_null(column, math.nan).to_numpy(
                zero_copy_only=False), float)[mine]
        else:
            got = [None if v is None else json.loads(v)
                   for v in _values(trials, lr_key, fixed, extras)]
            lr[mine] = np.array([g if isinstance(g, (int, float)) else math.nan
                                 for g in got], float)[mine]
        verdict, stable = row["verdict"], row["stable_lr"]
        if verdict in WITH_STABLE_LR and stable is not None:
            limit[mine] = margin * stable * (1 + 1e-12)  # lr == margin x stable is kept
        else:
            why[mine] = (ERROR if verdict == Verdict.ERROR.value
                         else UNSTABLE if verdict == Verdict.UNSTABLE_AT_LOWER.value
                         else UNSETTLED)
    why[~found] = NO_COMBO
    judged = found & (why == "")
    why[judged & np.isnan(lr)] = NO_LR
    why[judged & ~np.isnan(lr) & (lr > limit)] = ABOVE
    keep = why == ""
    counts = {reason: int((why == reason).sum()) for reason in REASONS}
    return keep, {k: v for k, v in counts.items() if v}


def margin_line(frontier_dir: str | os.PathLike[str], margin: float, kept: int, total: int,
                counts: Mapping[str, int], lr_key: str = "lr") -> str:
    """The one line ``tune-sana best`` prints about a margin: how many trials it left out and
    why."""
    head = (f"restricted by the frontier of {frontier_dir}: {lr_key} <= {margin:g} x the "
            f"stable {lr_key} of the trial's combination")
    left = total - kept
    if not left:
        return f"{head}; no trial left out ({total} trials)"
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    return f"{head}; {left} of {total} trials left out ({reasons})"
