"""PNG charts of a sweep, from its Parquet record only (matplotlib's Agg canvas, no pyplot).

- ``stability_map.png``: learning rate (log axis) against best validation loss, one marker and
  colour per precision mode; pruned trials hollow; diverged trials as a red x at their last
  finite validation loss after an update (read from history), or on the top edge if they never
  had one; collapsed trials filled dark red at their last (collapsed) validation loss. The
  base (the untouched model's validation loss) is a dashed line labelled "base": one line
  when all trials share it, else one per precision mode in its colour. One panel
  per run dir. A frontier run (one with frontier.parquet) also gets its stability frontier, one
  line per combination of its categorical settings in its precision's colour (one line style
  per combination within a precision): a solid vertical line at the stable lr and a shaded
  band up to the diverged lr; "stable to the upper bound" ends in a right-pointing marker at
  the bound, "unstable at the lower bound" is a dashed line with a left-pointing marker at the
  lower bound; a combination still searching is dotted; an error draws nothing.
- ``curves.png``: validation loss against step for the top trials, and for the diverged trials
  that looked best, up to their divergence; curves start at the step-0 row (the base), which
  is also drawn as a line. One row per run dir.
- the HTML report's sample grids (analysis/samples.py), each beside its trial's own small
  validation-loss curve (``trial_curve``).
- ``causes.png``: diverged and collapsed trials by cause (a collapse's is ``loss_collapse``), and
  diverged ones by first non-finite module, one bar per run dir.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from tune_sana.analysis import frontier as frontier_mod
from tune_sana.analysis.runs import Run
from tune_sana.analysis.samples import Gallery, gallery
from tune_sana.analysis.tables import PRECISION_ORDER, divergence_causes, ranking
from tune_sana.config import UserError
from tune_sana.outcomes import FINITE, INFEASIBLE, Outcome, Verdict
from tune_sana.record.readers import read_history

MARKERS = {"fp32": "o", "fp16-amp": "s", "bf16-amp": "^", "fp16": "D", "bf16": "v"}
COLOURS = {"fp32": "#1f77b4", "fp16-amp": "#ff7f0e", "bf16-amp": "#2ca02c", "fp16": "#9467bd",
           "bf16": "#8c564b"}
DIVERGED = "#d62728"
COLLAPSED = "#7f0000"  # finite but wrecked: dark red, filled
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]
# line colours for curves: tab10 without its red, which marks divergence
LINE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf", "#393b79"]


def last_finite_val(run: Run, trial_ids: Sequence[str]) -> pa.Table:
    """trial_id, last_val (float64: the val_loss of the highest step after the base's where it
    is finite) and last_step, for those of ``trial_ids`` with any finite val_loss after step 0
    (history holds no NaN)."""
    if not trial_ids:
        return pa.table({"trial_id": pa.array([], pa.string()),
                         "last_val": pa.array([], pa.float64()),
                         "last_step": pa.array([], pa.int64())})
    hist = read_history(run.path, ["trial_id", "step", "val_loss"], trial_ids=list(trial_ids))
    hist = hist.filter(pc.and_(pc.is_valid(hist["val_loss"]), pc.greater(hist["step"], 0)))
    hist = hist.sort_by([("trial_id", "ascending"), ("step", "ascending")])
    agg = hist.group_by("trial_id", use_threads=False).aggregate(
        [("val_loss", "last"), ("step", "max")])
    return agg.rename_columns(["trial_id", "last_val", "last_step"]).sort_by("trial_id")


def _curves(run: Run, trial_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """trial id -> (steps, val losses) where val_loss is finite, read for these trials only;
    from step 0 (the base) on."""
    if not trial_ids:
        return {}
    hist = read_history(run.path, ["trial_id", "step", "val_loss"], trial_ids=list(trial_ids))
    hist = hist.filter(pc.is_valid(hist["val_loss"]))
    hist = hist.sort_by([("trial_id", "ascending"), ("step", "ascending")])
    if hist.num_rows == 0:
        return {}
    encoded = pc.run_end_encode(hist["trial_id"].combine_chunks())
    ends = encoded.run_ends.to_numpy()
    steps = np.split(hist["step"].to_numpy(), ends[:-1])
    vals = np.split(hist["val_loss"].to_numpy(), ends[:-1])
    return dict(zip(encoded.values.to_pylist(), zip(steps, vals, strict=True), strict=True))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _log_y_if_wide(ax: object, values: np.ndarray) -> None:
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size and finite.max() / finite.min() > 20:
        ax.set_yscale("log")  # type: ignore[attr-defined]


# --- the base --------------------------------------------------------------------------------

BASE_COLOUR = "#555555"


def base_lines(trials: pa.Table) -> pa.Table:
    """precision, base (float64): the mean base_val_loss per precision mode of ``trials``
    (modes without one left out), or one row with a null precision when every trial's base
    prints the same (4 significant digits)."""
    known = trials.filter(pc.is_valid(trials["base_val_loss"]))
    low, high = pc.min(known["base_val_loss"]).as_py(), pc.max(known["base_val_loss"]).as_py()
    if low is None:
        return pa.table({"precision": pa.array([], pa.string()),
                         "base": pa.array([], pa.float64())})
    if f"{low:.4g}" == f"{high:.4g}":
        return pa.table({"precision": pa.nulls(1, pa.string()),
                         "base": [pc.mean(known["base_val_loss"]).as_py()]})
    agg = known.group_by("precision").aggregate([("base_val_loss", "mean")])
    return agg.rename_columns(["precision", "base"]).sort_by("precision")


def _draw_base(ax: Any, trials: pa.Table) -> list[float]:
    """Dashed base line(s) of ``trials`` on ``ax``, labelled 'base' (or 'base <precision>' in
    the precision's colour); returns the values drawn."""
    lines = base_lines(trials)
    for precision, value in zip(lines["precision"].to_pylist(), lines["base"].to_pylist(),
                                strict=True):
        colour = BASE_COLOUR if precision is None else COLOURS.get(precision, BASE_COLOUR)
        ax.axhline(value, linestyle="--", linewidth=1.1, color=colour, zorder=2,
                   label="base" if precision is None else f"base {precision}")
    return [float(v) for v in lines["base"].to_pylist()]


# --- stability map ---------------------------------------------------------------------------

def stability_points(run: Run) -> pa.Table:
    """Points of the stability map: trial_id, precision, lr, outcome, y (float64): best val
    loss for completed/pruned trials, last finite val loss for diverged and collapsed ones
    (null if none); error trials are left out."""
    trials = run.trials.filter(pc.is_in(run.trials["outcome"],
                                        pa.array([*FINITE, *INFEASIBLE])))
    diverged = trials.filter(pc.is_in(trials["outcome"], pa.array(list(INFEASIBLE))))
    last = last_finite_val(run, diverged["trial_id"].to_pylist())
    joined = trials.select(["trial_id", "precision", "lr", "outcome", "best_val_loss"]).join(
        last.select(["trial_id", "last_val"]), "trial_id", join_type="left outer")
    is_div = pc.is_in(joined["outcome"], pa.array(list(INFEASIBLE)))
    y = pc.if_else(is_div, joined["last_val"], joined["best_val_loss"])
    return joined.select(["trial_id", "precision", "lr", "outcome"]).append_column(
        "y", y).sort_by("trial_id")


# --- the stability frontier ------------------------------------------------------------------

FRONTIER_STYLES = ["-", "--", "-.", ":"]  # one per combination within a precision
FRONTIER_GREY = "#444444"  # a combination without a precision key


@dataclass(frozen=True)
class FrontierLine:
    """How one combination of a frontier run is drawn on the map."""

    label: str
    precision: str | None
    verdict: str
    stable_lr: float | None
    diverged_lr: float | None
    lr_low: float | None
    lr_high: float | None
    colour: str
    style: str

    @property
    def drawn_style(self) -> Any:
        """The style its line is drawn in: dashed when unstable at the lower bound, dotted
        while not settled, else its own."""
        if self.verdict == Verdict.UNSTABLE_AT_LOWER.value:
            return "--"
        return ":" if self.verdict == Verdict.SEARCHING.value else self.style

    @property
    def legend(self) -> str:
        """'frontier fp16-amp, variant fp16: 3.1e-4..3.9e-4' (the label without its leading
        'precision ')."""
        stable, diverged = frontier_mod.fmt_lrs(self.stable_lr, self.diverged_lr)
        name = self.label.removeprefix("precision ") or frontier_mod.NO_SETTING
        if self.verdict == Verdict.BRACKETED.value:
            return f"frontier {name}: {stable}..{diverged}"
        if self.verdict == Verdict.STABLE_TO_UPPER.value:
            return f"frontier {name}: stable to the upper bound {stable}"
        if self.verdict == Verdict.UNSTABLE_AT_LOWER.value:
            return f"frontier {name}: unstable at the lower bound {diverged}"
        return f"frontier {name}: not settled ({stable}..{diverged})"


def frontier_lines(run: Run) -> list[FrontierLine]:
    """The combinations of ``run``'s frontier.parquet that have an lr to draw (errors and
    searching rows with no lr yet are left out), by precision (Precision's order), then in the
    space's order (the first combination of a precision drawn solid); empty for a run without
    a frontier."""
    table = frontier_mod.read(run.path)
    if table is None:
        return []
    lines: list[FrontierLine] = []
    used: dict[str | None, int] = {}  # precision -> line styles handed out
    rows = frontier_mod.in_space_order(table, frontier_mod.space_of(run.path))
    rows.sort(key=lambda r: _precision_rank(frontier_mod.combo(r).get("precision")))  # stable
    for row in rows:
        if row["verdict"] == Verdict.ERROR.value or (row["stable_lr"] is None
                                                     and row["diverged_lr"] is None):
            continue
        precision = frontier_mod.combo(row).get("precision")
        precision = None if precision is None else str(precision)
        n = used.get(precision, 0)
        used[precision] = n + 1
        lines.append(FrontierLine(
            row["label"], precision, row["verdict"], row["stable_lr"], row["diverged_lr"],
            row["lr_low"], row["lr_high"],
            COLOURS.get(precision, FRONTIER_GREY) if precision else FRONTIER_GREY,
            FRONTIER_STYLES[n % len(FRONTIER_STYLES)]))
    return lines


def _precision_rank(precision: Any) -> int:
    return PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(
        PRECISION_ORDER)


def _draw_frontier(ax: Any, lines: Sequence[FrontierLine]) -> None:
    """The frontier lines on ``ax`` (each Line2D labelled with its legend text); markers at a
    bound sit near the bottom edge, one height per line so that they do not hide each
    other."""
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    for i, line in enumerate(lines):
        height = 0.05 + 0.045 * (i % 8)
        common = {"color": line.colour, "linewidth": 1.8, "zorder": 2.5, "label": line.legend}
        if line.verdict == Verdict.UNSTABLE_AT_LOWER.value:
            at = line.diverged_lr if line.diverged_lr is not None else line.lr_low
            ax.axvline(at, linestyle=line.drawn_style, **common)
            ax.plot([at], [height], marker="<", markersize=9, color=line.colour,
                    transform=bottom, clip_on=False, zorder=5, linestyle="")
            continue
        settled = line.verdict != Verdict.SEARCHING.value
        style = line.drawn_style
        if line.stable_lr is not None:
            ax.axvline(line.stable_lr, linestyle=style, **common)
        elif line.diverged_lr is not None:  # searching: only a divergence seen so far
            ax.axvline(line.diverged_lr, linestyle=style, **common)
        if line.stable_lr is not None and line.diverged_lr is not None:
            ax.axvspan(line.stable_lr, line.diverged_lr, color=line.colour,
                       alpha=0.14 if settled else 0.07, zorder=1, linewidth=0)
        if line.verdict == Verdict.STABLE_TO_UPPER.value and line.stable_lr is not None:
            ax.plot([line.stable_lr], [height], marker=">", markersize=9, color=line.colour,
                    transform=bottom, clip_on=False, zorder=5, linestyle="")


# Above this many points in a run, the map gets one panel per precision mode.
FACET_ABOVE = 150


def _draw_points(ax: Any, pts: pa.Table, precisions: Sequence[str], big: bool) -> int:
    """Scatter one run's points on ``ax``: completed filled, pruned hollow, collapsed filled
    dark red, diverged a red x in the precision's shape (on the top edge if it never had a
    finite val loss). Returns the number drawn on the top edge."""
    lr = pts["lr"].to_numpy(zero_copy_only=False).astype(float)
    y = pts["y"].to_numpy(zero_copy_only=False).astype(float)
    outcome = np.asarray(pts["outcome"].to_pylist(), dtype=object)
    precision = np.asarray(pts["precision"].to_pylist(), dtype=object)
    size, alpha = (22, 0.75) if big else (46, 1.0)
    div = outcome == Outcome.DIVERGED.value
    never = div & ~np.isfinite(y)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for p in precisions:
        mine = precision == p
        done = mine & (outcome == Outcome.COMPLETED.value)
        pruned = mine & (outcome == Outcome.PRUNED.value)
        collapsed = mine & (outcome == Outcome.COLLAPSED.value) & np.isfinite(y)
        ax.scatter(lr[done], y[done], marker=MARKERS[p], s=size, color=COLOURS[p],
                   edgecolors="black", linewidths=0.4, zorder=4)
        ax.scatter(lr[collapsed], y[collapsed], marker=MARKERS[p], s=size, color=COLLAPSED,
                   edgecolors="black", linewidths=0.4, zorder=4)
        ax.scatter(lr[pruned], y[pruned], marker=MARKERS[p], s=size, facecolors="none",
                   edgecolors=COLOURS[p], linewidths=1.2, zorder=4)
        for mask, ys, kwargs in ((div & ~never & mine, y, {}),
                                 (never & mine, np.full(len(y), 0.97),
                                  {"transform": top, "clip_on": False})):
            if mask.any():  # under the finite points, so the safe region stays visible
                ax.scatter(lr[mask], ys[mask], marker=MARKERS[p], s=size * 1.7,
                           facecolors="none", edgecolors=DIVERGED, linewidths=1.0,
                           alpha=alpha, zorder=3, **kwargs)
                ax.scatter(lr[mask], ys[mask], marker="x", s=size * 0.65, color=DIVERGED,
                           linewidths=1.4, alpha=alpha, zorder=3, **kwargs)
    return int(never.sum())


def _counts(run: Run, pts: pa.Table) -> str:
    outcome = pts["outcome"]
    n = {o: int(pc.sum(pc.equal(outcome, o).cast(pa.int64())).as_py() or 0)
         for o in (*FINITE, Outcome.DIVERGED.value)}
    errors = int(pc.sum(pc.equal(run.trials["outcome"], Outcome.ERROR.value)
                        .cast(pa.int64())).as_py() or 0)
    collapsed = int(pc.sum(pc.equal(outcome, Outcome.COLLAPSED.value)
                           .cast(pa.int64())).as_py() or 0)
    return (f"{n['completed']} completed, {n['pruned']} pruned, {n['diverged']} diverged"
            + (f", {collapsed} collapsed" if collapsed else "")
            + (f", {errors} errored (not shown)" if errors else ""))


def stability_map(runs: Sequence[Run]) -> Figure:
    """One panel per run; one panel per run and precision mode when a run has more than
    FACET_ABOVE points (rows: runs)."""
    points = [stability_points(r) for r in runs]
    precisions = [p for p in PRECISION_ORDER
                  if any(pc.any(pc.equal(t["precision"], p)).as_py() for t in points)]
    facet = max(t.num_rows for t in points) > FACET_ABOVE and len(precisions) > 1
    if facet:
        fig = Figure(figsize=(3.3 * len(precisions) + 1.8, 3.4 * len(runs) + 0.8),
                     layout="constrained")
        grid = fig.subplots(len(runs), len(precisions), sharex=True, sharey=True,
                            squeeze=False)
    else:
        fig = Figure(figsize=(6.4 * len(runs) + 1.0, 5.2), layout="constrained")
        grid = fig.subplots(1, len(runs), sharex=True, sharey=True, squeeze=False)
    edge_total = 0
    bases: list[float] = []
    drawn_lines: list[FrontierLine] = []
    for r, (run, pts) in enumerate(zip(runs, points, strict=True)):
        panels = ([(grid[r][c], [p]) for c, p in enumerate(precisions)] if facet
                  else [(grid[0][r], precisions)])
        on_edge = 0
        lines = frontier_lines(run)
        for ax, shown in panels:
            mine = pts.filter(pc.is_in(pts["precision"], pa.array(shown)))
            on_edge += _draw_points(ax, mine, shown, facet)
            here = [f for f in lines if not facet or f.precision in (None, *shown)]
            _draw_frontier(ax, here)
            drawn_lines += [f for f in here if f not in drawn_lines]
            drawn = _draw_base(ax, run.trials.filter(pc.is_in(run.trials["precision"],
                                                              pa.array(shown))))
            bases.extend(drawn)
            ax.set_xscale("log")
            ax.grid(True, which="major", alpha=0.3)
            if facet:
                ax.set_title(f"{run.label}: {shown[0]}\n{_counts(run, mine).split(', err')[0]}",
                             fontsize=9)
        edge_total += on_edge
        if not facet:
            edge = f"\n{on_edge} diverged before any validation: top edge" if on_edge else ""
            grid[0][r].set_title(f"{run.label}\n{_counts(run, pts)}{edge}", fontsize=10)
    for ax in grid[-1]:
        ax.set_xlabel("peak learning rate (log scale)")
    for row in grid:
        row[0].set_ylabel("best validation loss\n(diverged, collapsed: last finite value)")
    every_y = np.concatenate([p["y"].to_numpy(zero_copy_only=False) for p in points]
                             + [np.array(bases)]).astype(float)
    if every_y.size:
        _log_y_if_wide(grid[0][0], every_y)
    handles = [Line2D([], [], marker=MARKERS[p], color=COLOURS[p], linestyle="",
                      markeredgecolor="black", markersize=7, label=p) for p in precisions]
    handles += [Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="",
                       markersize=7, label="pruned (hollow)"),
                Line2D([], [], marker="x", color=DIVERGED, linestyle="", markersize=8,
                       markeredgewidth=2,
                       label="diverged: red x in\nits precision's shape,\nat last finite val")]
    if any(pc.any(pc.equal(t["outcome"], Outcome.COLLAPSED.value)).as_py() for t in points):
        handles.append(Line2D(
            [], [], marker="o", color=COLLAPSED, linestyle="", markeredgecolor="black",
            markersize=7, label="collapsed (dark red):\nfinite, but stayed\nabove factor x base"))
    if bases:
        handles.append(Line2D([], [], color=BASE_COLOUR, linestyle="--",
                              label="base (step 0,\nbefore any update)"))
    handles += _frontier_handles(drawn_lines)
    if drawn_lines:  # room for the longer legend beside the panels
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 1.5, max(height, 0.42 * len(handles) + 1.2))
    fig.legend(handles=handles, loc="outside right center", title="precision / outcome",
               fontsize=9)
    title = "Stability map: learning rate vs validation loss, by precision mode"
    if drawn_lines:
        title += ("\nvertical lines: the stability frontier (at the stable lr; shaded up to "
                  "the diverged lr)")
    if facet and edge_total:
        title += f"\n({edge_total} diverged before any validation: drawn on the top edge)"
    fig.suptitle(title)
    return fig


def _frontier_handles(lines: Sequence[FrontierLine]) -> list[Line2D]:
    """Legend entries: one per frontier line, then one per kind of bound marker drawn."""
    handles = [Line2D([], [], color=f.colour, linewidth=1.8, linestyle=f.drawn_style,
                      label=f.legend.replace(": ", ":\n  ", 1)) for f in lines]
    verdicts = {f.verdict for f in lines}
    if Verdict.STABLE_TO_UPPER.value in verdicts:
        handles.append(Line2D([], [], marker=">", color=FRONTIER_GREY, linestyle="",
                              markersize=8, label="stable to the upper bound"))
    if Verdict.UNSTABLE_AT_LOWER.value in verdicts:
        handles.append(Line2D([], [], marker="<", color=FRONTIER_GREY, linestyle="",
                              markersize=8, label="unstable at the lower bound"))
    return handles


# --- curves ----------------------------------------------------------------------------------

def _label(trials: pa.Table, tid: str) -> str:
    row = trials.filter(pc.equal(trials["trial_id"], tid)).slice(0, 1).to_pylist()
    if not row:
        return f"{tid} (running)"
    r = row[0]
    return f"{tid} {r['precision']} lr={r['lr']:.1e}"


def curves(runs: Sequence[Run], top: int = 8) -> Figure:
    fig = Figure(figsize=(13, 5.6 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, run in enumerate(runs):
        best = ranking([run], [], top)["trial_id"].to_pylist()
        all_div = run.trials.filter(pc.equal(run.trials["outcome"], Outcome.DIVERGED.value))
        div = all_div.filter(pc.is_valid(all_div["best_val_loss"]))
        no_curve = all_div.num_rows - div.num_rows
        div = div.sort_by([("best_val_loss", "ascending"), ("trial_id", "ascending")])
        div = div.slice(0, top)
        div_ids = div["trial_id"].to_pylist()
        data = _curves(run, [*best, *div_ids])
        left, right = axes[row]
        every: list[np.ndarray] = []
        for i, tid in enumerate(best):
            if tid in data:
                steps, vals = data[tid]
                left.plot(steps, vals, marker=".", markersize=4, linewidth=1.3,
                          color=LINE_COLOURS[i % len(LINE_COLOURS)],
                          label=_label(run.trials, tid))
                every.append(vals)
        causes = dict(zip(div_ids, div["divergence_cause"].to_pylist(), strict=True))
        at = dict(zip(div_ids, div["diverged_step"].to_pylist(), strict=True))
        for i, tid in enumerate(div_ids):
            if tid in data:
                steps, vals = data[tid]
                right.plot(steps, vals, marker=".", markersize=4, linewidth=1.3,
                           color=LINE_COLOURS[i % len(LINE_COLOURS)],
                           label=f"{_label(run.trials, tid)}: {causes[tid]} at step {at[tid]}")
                right.plot(steps[-1:], vals[-1:], marker="x", color=DIVERGED, markersize=9,
                           markeredgewidth=2, linestyle="", zorder=4)
                every.append(vals)
        shown = f"the {len(div_ids)} that looked best" if len(div_ids) < div.num_rows else "all"
        panels = ((left, f"top {len(best)} trials (completed / pruned / running)", best, ""),
                  (right, f"diverged trials up to divergence ({shown}; x = last finite value)",
                   div_ids, f"{no_curve} diverged before any validation after the base: no curve"
                   if no_curve else "no trial diverged"))
        bases: list[float] = []
        for ax, title, ids, empty in panels:
            bases = _draw_base(ax, run.trials)
            ax.set_title(f"{run.label}\n{title}", fontsize=10)
            ax.set_xlabel("step (optimizer updates; 0 = the base, before any)")
            ax.set_xlim(left=0)
            ax.set_ylabel("validation loss")
            ax.grid(True, alpha=0.3)
            if ids:
                ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                          ncols=2, frameon=False)
            if empty and (not ids or no_curve):
                # below the middle: the base line is drawn across the middle of an empty panel
                ax.text(0.5, 0.35 if not ids else 0.03, empty if not ids else f"(+ {empty})",
                        ha="center", va="center" if not ids else "bottom",
                        transform=ax.transAxes, fontsize=11 if not ids else 8, color="grey")
        if every:
            joined = np.concatenate([*every, np.array(bases)])
            _log_y_if_wide(left, joined)
            _log_y_if_wide(right, joined)
    fig.suptitle("Validation-loss curves")
    return fig


# --- causes ----------------------------------------------------------------------------------

def causes_chart(runs: Sequence[Run]) -> Figure:
    results = [divergence_causes(r) for r in runs]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    by_cause = [res[0] for res in results]
    by_module = [res[1] for res in results]
    for ax, tables, key, title, who in (
            (axes[0], by_cause, "divergence_cause", "by cause", "diverged or collapsed trials"),
            (axes[1], by_module, "nonfinite_module", "by first non-finite module (top 10)",
             "diverged trials")):
        names: list[str] = []
        for t in tables:
            names += [n for n in t[key].to_pylist() if n not in names]
        totals = {n: sum(dict(zip(t[key].to_pylist(), t["trials"].to_pylist(),
                                  strict=True)).get(n, 0) for t in tables) for n in names}
        names = sorted(names, key=lambda n: (-totals[n], n))[:10][::-1]
        height = 0.8 / max(len(runs), 1)
        for i, (run, t) in enumerate(zip(runs, tables, strict=True)):
            count = dict(zip(t[key].to_pylist(), t["trials"].to_pylist(), strict=True))
            med = dict(zip(t[key].to_pylist(), t["median_step"].to_pylist(), strict=True))
            # first run on top within each group (the y axis counts upwards)
            ypos = np.arange(len(names)) - (i - (len(runs) - 1) / 2) * height
            widths = [count.get(n, 0) for n in names]
            bars = ax.barh(ypos, widths, height=height * 0.95,
                           color=RUN_COLOURS[i % len(RUN_COLOURS)], label=run.label)
            ax.bar_label(bars, labels=[
                "" if not c else f"{c}  (median step {med[n]:g})" if med.get(n) is not None
                else f"{c}" for n, c in zip(names, widths, strict=True)],
                padding=3, fontsize=8)
        ax.set_yticks(np.arange(len(names)), names, fontsize=8)
        pad = max(0.6, (4 - len(names)) / 2)  # a few bars stay bar-shaped, centred
        ax.set_ylim(-pad, len(names) - 1 + pad)
        ax.set_xlabel(who)
        ax.set_title(title, fontsize=10)
        right = max([1, *(v for t in tables for v in t["trials"].to_pylist())])
        ax.set_xlim(0, right * 1.45)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if not names:
            ax.text(0.5, 0.5, f"no trial {who.split(' trials')[0]}", ha="center", va="center",
                    transform=ax.transAxes, fontsize=12, color="grey")
        if len(runs) > 1 and names:
            ax.legend(fontsize=8, loc="lower right")
    medians = ", ".join(("" if len(runs) == 1 else f"{r.label}: ")
                        + ("-" if m is None else f"{m:g}")
                        for r, (_, _, m) in zip(runs, results, strict=True))
    fig.suptitle(f"Why trials diverged or collapsed (median step they ended at: {medians})")
    return fig


# --- sample grids beside their curves -------------------------------------------------------

def trial_curve(run: Run, trial_id: str) -> Figure:
    """One trial's validation loss against step (from step 0, the base), small, with the
    base as a dashed line: what sits beside the trial's sample grid in the HTML report."""
    fig = Figure(figsize=(3.6, 2.1), layout="constrained")
    ax = fig.subplots()
    data = _curves(run, [trial_id])
    _draw_base(ax, run.trials.filter(pc.equal(run.trials["trial_id"], trial_id)))
    if trial_id in data:
        steps, vals = data[trial_id]
        ax.plot(steps, vals, marker=".", markersize=3, linewidth=1.2, color=LINE_COLOURS[0])
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("val loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    return fig


def galleries(runs: Sequence[Run], top: int = 8) -> list[Gallery]:
    """Each run's sample grids (analysis/samples.py) with each trial's curve drawn beside its
    grid; runs without any grid are left out."""
    out = []
    for run in runs:
        found = gallery(run, top)
        if found is None:
            continue
        rows = [replace(row, curve=_png(trial_curve(run, row.trial_id))) for row in found.rows]
        out.append(replace(found, rows=rows))
    return out


# --- all of them -----------------------------------------------------------------------------

def render_pngs(runs: Sequence[Run], top: int = 8) -> dict[str, bytes]:
    """File name -> PNG bytes for the three charts."""
    out = {}
    for name, make in (("stability_map.png", lambda: stability_map(runs)),
                       ("curves.png", lambda: curves(runs, top)),
                       ("causes.png", lambda: causes_chart(runs))):
        out[name] = _png(make())
    return out


def save_pngs(images: Mapping[str, bytes], folder: Path) -> list[Path]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, png in images.items():
            path = folder / name
            path.write_bytes(png)
            written.append(path)
    except OSError as err:
        raise UserError(f"--plots {folder}: cannot write ({err.strerror})") from None
    return written

