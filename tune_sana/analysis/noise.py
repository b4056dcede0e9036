"""The noise rule: how well a configuration's validation loss is known, and which results can be
told apart, from the confirm stage's fresh seeds.

After the search, the top configurations are re-run with fresh seeds (``stage`` "confirm", the
``config_id`` of the search trial they replicate). Per configuration, the mean and standard
error (SE = sample standard deviation / sqrt(n)) of best_val_loss over its completed confirm
seeds say what it is worth; the search trial's own value is kept apart: it was picked for being
low, so it is biased low. Two configurations cannot be told apart when

    |mean_a - mean_b| <= 2 * sqrt(se_a^2 + se_b^2)

and a configuration beats its base when ``base_val_loss - mean > 2 * se``. An SE that is not
known (one completed seed) never tells anything apart.

The best configuration is the lowest mean among those that diverged in no seed and completed at
least one; ``report`` marks the others against it and ``tune-sana best`` prints it. Computed
with one ``group_by`` per stage and a join; no Python loop over rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tune_sana.outcomes import INFEASIBLE, Outcome, Stage

SEARCH = Stage.SEARCH.value
CONFIRM = Stage.CONFIRM.value
# Marks of the ``vs_best`` column: the best; not distinguishable from it; worse than it; lower
# than it but disqualified (a seed diverged or collapsed).
BEST, LIKE_BEST, WORSE, BETTER = "best", "~best", "worse", "better"
# Marks of the ``vs_base`` column.
BEATS_BASE, LIKE_BASE, WORSE_THAN_BASE = "better", "~base", "worse"
CONFIRM_HINT = ("add 'search: {confirm: {top_k: 3, seeds: 2}}' to the space to re-run the top "
                "configurations with fresh seeds")


def has_confirm(trials: pa.Table) -> bool:
    """Whether any finished trial of ``trials`` ran in the confirm stage."""
    return bool(pc.any(pc.equal(trials["stage"], CONFIRM)).as_py())


def told_apart(mean_a: float, se_a: float | None, mean_b: float, se_b: float | None) -> bool:
    """The noise rule for two means (False where either SE is unknown)."""
    if se_a is None or se_b is None:
        return False
    return abs(mean_a - mean_b) > 2 * math.sqrt(se_a ** 2 + se_b ** 2)


def confirmed(trials: pa.Table, columns: Sequence[str] = ()) -> pa.Table:
    """One row per config_id that has confirm-stage trials, by mean (unknown last, ties by
    config_id).

    Columns: config_id; ``columns`` (the first replica's values: replicas differ only in
    seed); ``seeds`` (finished confirm trials), ``diverged`` (of those, diverged or collapsed:
    the seeds that disqualify it), ``n`` (completed with
    a best_val_loss: the ones averaged); ``mean``, ``se`` (null below two values),
    ``improvement`` (mean of the seeds' improvement), ``base`` (mean base_val_loss);
    ``search_trial`` / ``search_val``: the best completed search trial of that config_id and
    its own best_val_loss; ``vs_best`` (BEST, LIKE_BEST, WORSE, BETTER; null without a mean or
    without a best) and ``vs_base`` (BEATS_BASE, LIKE_BASE, WORSE_THAN_BASE; null without a
    mean or base). ``trials`` needs trial_id, outcome, best_val_loss, improvement,
    base_val_loss, stage, config_id and ``columns``.
    """
    conf = trials.filter(pc.equal(trials["stage"], CONFIRM))
    done = pc.and_(pc.equal(conf["outcome"], Outcome.COMPLETED.value),
                   pc.is_valid(conf["best_val_loss"]))
    null = pa.scalar(None, pa.float64())
    work = pa.table({
        "config_id": conf["config_id"],
        "trial_id": conf["trial_id"],
        "div": pc.is_in(conf["outcome"], pa.array(list(INFEASIBLE))).cast(pa.int64()),
        "val": pc.if_else(done, conf["best_val_loss"], null),
        "imp": pc.if_else(done, conf["improvement"], null),
        "base": conf["base_val_loss"],
        **{name: conf[name] for name in columns},
    })
    agg = work.group_by("config_id", use_threads=False).aggregate([
        *((name, "first") for name in columns),
        ("trial_id", "count"), ("div", "sum"), ("val", "count"), ("val", "mean"),
        ("val", "stddev", pc.VarianceOptions(ddof=1)), ("imp", "mean"), ("base", "mean")])
    n = agg["val_count"]
    stats = pa.table({
        "config_id": agg["config_id"],
        **{name: agg[f"{name}_first"] for name in columns},
        "seeds": agg["trial_id_count"],
        "diverged": agg["div_sum"],
        "n": n,
        "mean": agg["val_mean"],
        "se": pc.divide(agg["val_stddev"], pc.sqrt(n.cast(pa.float64()))),
        "improvement": agg["imp_mean"],
        "base": agg["base_mean"],
    })
    search = _search_values(trials)
    stats = stats.join(search, "config_id", join_type="left outer")
    stats = stats.sort_by([("mean", "ascending"), ("config_id", "ascending")])
    stats = stats.append_column("vs_best", _vs_best(stats))
    return stats.append_column("vs_base", _vs_base(stats))


def _search_values(trials: pa.Table) -> pa.Table:
    """config_id, search_trial, search_val: the best completed search-stage trial per
    config_id (a null stage is a search trial: runs written before the confirm stage)."""
    search = trials.filter(pc.and_(
        pc.and_(pc.invert(pc.fill_null(pc.equal(trials["stage"], CONFIRM), False)),
                pc.equal(trials["outcome"], Outcome.COMPLETED.value)),
        pc.and_(pc.is_valid(trials["best_val_loss"]), pc.is_valid(trials["config_id"]))))
    search = search.select(["config_id", "trial_id", "best_val_loss"]).sort_by(
        [("config_id", "ascending"), ("best_val_loss", "ascending"), ("trial_id", "ascending")])
    agg = search.group_by("config_id", use_threads=False).aggregate(
        [("trial_id", "first"), ("best_val_loss", "first")])
    return agg.rename_columns(["config_id", "search_trial", "search_val"])


def _vs_best(stats: pa.Table) -> pa.Array:
    """The ``vs_best`` marks of ``stats`` (sorted by mean): against the first row that
    qualifies (no diverged seed, a mean), by :func:`told_apart`. One row per confirmed
    configuration (top_k of them), so the rule is applied row by row."""
    rows = stats.select(["diverged", "mean", "se"]).to_pylist()
    index = next((i for i, r in enumerate(rows) if r["diverged"] == 0 and r["mean"] is not None),
                 None)
    if index is None:
        return pa.nulls(stats.num_rows, pa.string())
    best = rows[index]

    def mark(i: int, row: dict[str, Any]) -> str | None:
        if row["mean"] is None:
            return None
        if i == index:
            return BEST
        if not told_apart(row["mean"], row["se"], best["mean"], best["se"]):
            return LIKE_BEST
        return BETTER if row["mean"] < best["mean"] else WORSE

    return pa.array([mark(i, r) for i, r in enumerate(rows)], pa.string())


def _vs_base(stats: pa.Table) -> pa.Array:
    """The ``vs_base`` marks: beyond 2 SE below the base, above it, or within the noise."""
    gap = pc.subtract(stats["base"], stats["mean"])
    bound = pc.multiply(stats["se"], 2.0)
    below = pc.fill_null(pc.greater(gap, bound), False)
    above = pc.fill_null(pc.less(gap, pc.negate(bound)), False)
    marks = pc.if_else(below, BEATS_BASE, pc.if_else(above, WORSE_THAN_BASE, LIKE_BASE))
    known = pc.and_(pc.is_valid(stats["mean"]), pc.is_valid(stats["base"]))
    return pc.if_else(known, marks, pa.scalar(None, pa.string()))
