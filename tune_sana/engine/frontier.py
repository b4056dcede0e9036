"""The frontier search: the largest learning rate each combination of settings survives.

With ``search.algorithm: frontier`` the space has one ``loguniform`` key (the learning rate)
and any number of categorical ones (``choice`` / ``grid``). Every combination of the categorical
values is a *combo* (precision x variant x attention_fp32 x ...). For each combo the search
looks, on a log scale between the lr key's bounds, for the boundary between learning rates at
which a trial stays finite for its whole step budget and learning rates at which it diverges.

The rules, per combo (``Combo.next_probe`` and ``Combo.verdict``):

- A probe is one trial: an lr and a trial seed. An lr has *diverged* if a probe at it diverged
  in any seed (a probe that collapsed, finite but wrecked, counts as diverged, its cause
  ``loss_collapse``), and is *stable* if every probe at it completed finite. The bracket is
  ``(stable_lr, diverged_lr)``: the lowest diverged lr, and the highest stable lr below it.
- The upper bound is probed first (a diverging trial stops early, so it is cheap). A probe that
  diverged at step 0, before any update, broke whatever its lr: the lower bound is next.
- While the bracket is wider than ``tolerance`` (a ratio), the widest gap between its ends and
  the probes still running inside it is bisected (at its geometric middle) with the first
  seed (or, once another seed has diverged at the bracket's diverging end, with that one):
  with several free slots this is k-section, and slots are shared across combos.
- Once it is narrow enough, the other seeds run at both ends. A seed that diverges at the
  stable end makes that lr diverged: the bracket moves down and bisection resumes.
- Verdicts: ``bracketed`` (both ends run in every seed, ratio <= tolerance);
  ``stable_to_upper`` (finite at the upper bound in every seed); ``unstable_at_lower``
  (diverged at the lower bound; every seed run there for the count); ``error`` (a probe raised:
  no verdict); ``searching`` otherwise (also when the trial budget ran out first).

The lower bound is never assumed stable: it is probed when the bracket has narrowed onto it.
Stable lrs above a diverged one (divergence that depends on the lr in no simple order) are kept
in the record but do not move the bracket.

The searcher (``FrontierSearcher``) hands these probes to Ray Tune, so the same Tuner,
stopper, recorder, resume and cluster paths run them; it ends the search (FINISHED) once every
combo has a verdict. After each probe it rewrites ``frontier.parquet`` (one row per combo,
atomically). Its state is saved with Ray's experiment state and, on --resume, completed from
the probes already in trials.parquet, so a bisection cut short goes on where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.tune.search import Searcher

from tune_sana.config import TrialConfig
from tune_sana.engine.relay import unpack
from tune_sana.engine.space import SweepSpec
from tune_sana.engine.stopping import is_diverged
from tune_sana.outcomes import INFEASIBLE, Outcome, Stage, Verdict

STAGE = Stage.FRONTIER.value
SEED_KEY = "seed"
DEFAULT_SEED = int(TrialConfig.model_fields[SEED_KEY].default)
_REL = 1e-9  # float slack when comparing a ratio with the tolerance

COMPLETED, DIVERGED, ERROR = Outcome.COMPLETED.value, Outcome.DIVERGED.value, Outcome.ERROR.value


# --- the spec's side ----------------------------------------------------------------------------

def lr_key(spec: SweepSpec) -> str:
    """The bisected key: the space's one loguniform dimension."""
    return next(k for k, d in spec.space.items() if d.kind == "loguniform")


def combo_keys(spec: SweepSpec) -> tuple[str, ...]:
    """The categorical keys, in space order."""
    return tuple(k for k, d in spec.space.items() if d.kind in ("choice", "grid"))


def combo_id(values: Mapping[str, Any]) -> str:
    """12 hex digits naming a combination of categorical values (confirm.digest, as
    config_id: a whole float is the integer, an enum its value)."""
    from tune_sana.engine.confirm import digest

    return digest(values)


def label(values: Mapping[str, Any]) -> str:
    """"precision fp16-amp, attention_fp32 true": the values in space order."""
    def text(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        return str(getattr(v, "value", v))

    return ", ".join(f"{k} {text(v)}" for k, v in values.items())


def combos(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the categorical values, in space order."""
    keys = combo_keys(spec)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(spec.space[k].values() for k in keys))]


def seeds(spec: SweepSpec) -> list[int]:
    """The R trial seeds: the fixed seed (or the trial's default) and the next R - 1."""
    base = spec.fixed.get(SEED_KEY)
    first = DEFAULT_SEED if base is None else int(base)
    settings = spec.search.frontier
    return list(range(first, first + (settings.seeds if settings else 2)))


def tolerance(spec: SweepSpec) -> float:
    settings = spec.search.frontier
    return float(settings.tolerance) if settings else 1.25


# --- one combination ------------------------------------------------------------------------------

@dataclass
class Probe:
    """One finished trial of the search."""

    lr: float
    seed: int
    outcome: str  # completed | diverged | error
    steps: int = 0
    cause: str | None = None
    step: int | None = None
    module: str | None = None
    error: str | None = None
    trial_id: str | None = None


@dataclass
class Combo:
    """The probes of one combination and the rules that choose the next one."""

    values: dict[str, Any]
    low: float
    high: float
    probes: list[Probe] = field(default_factory=list)
    running: list[tuple[float, int]] = field(default_factory=list)  # (lr, seed) in flight

    @property
    def id(self) -> str:
        return combo_id(self.values)

    def _at(self, lr: float) -> list[Probe]:
        return [p for p in self.probes if p.lr == lr]

    def _ran(self, lr: float, seed: int) -> bool:
        return any(p.lr == lr and p.seed == seed for p in self.probes) or \
            (lr, seed) in self.running

    def bracket(self) -> tuple[float | None, float | None]:
        """(highest stable lr below the lowest diverged one, lowest diverged lr)."""
        lrs = sorted({p.lr for p in self.probes if p.outcome != ERROR})
        diverged = [lr for lr in lrs if any(p.outcome == DIVERGED for p in self._at(lr))]
        hi = diverged[0] if diverged else None
        stable = [lr for lr in lrs if (hi is None or lr < hi)
                  and all(p.outcome == COMPLETED for p in self._at(lr))]
        return (stable[-1] if stable else None), hi

    def _narrow(self, a: float, b: float, tol: float) -> bool:
        return b / a <= tol * (1 + _REL)

    def next_probe(self, tol: float, seeds: Sequence[int]) -> tuple[float, int] | None:
        """The next (lr, seed) to run, or None while nothing is worth starting."""
        if self.error() is not None:
            return None
        lo, hi = self.bracket()
        first = self._fragile_seed(hi, seeds)

        def missing(lr: float) -> tuple[float, int] | None:
            return next(((lr, s) for s in seeds if not self._ran(lr, s)), None)

        if hi is None and lo == self.high:  # finite at the upper bound: its other seeds
            return missing(self.high)
        if hi == self.low:  # diverged at the lower bound: its other seeds, for the count
            return missing(self.low)
        if hi is None and not self._ran(self.high, first):
            return (self.high, first)
        if hi is not None and lo is None and self._before_any_update(hi) \
                and not self._ran(self.low, first):
            return (self.low, first)  # it broke before any update: lr cannot have mattered
        a = lo if lo is not None else self.low
        b = hi if hi is not None else self.high
        if not self._narrow(a, b, tol):
            return self._split(a, b, tol, first)
        if lo is None:  # narrowed onto the lower bound, which is never assumed stable
            return None if self._ran(self.low, first) else (self.low, first)
        if hi is None:  # the upper bound is still running
            return None
        return missing(lo) or missing(hi)

    def _fragile_seed(self, hi: float | None, seeds: Sequence[int]) -> int:
        """The seed bisection runs with: the first seed, or the first one that diverged at
        the bracket's diverging end (it is the one whose boundary is lowest so far)."""
        bad = sorted(p.seed for p in self._at(hi) if p.outcome == DIVERGED) if hi else []
        return bad[0] if bad and bad[0] in seeds else seeds[0]

    def _before_any_update(self, lr: float) -> bool:
        """Whether the probes that diverged at ``lr`` did so at step 0 (the base's own
        evaluation, before the first optimizer update)."""
        bad = [p for p in self._at(lr) if p.outcome == DIVERGED]
        return bool(bad) and all(p.step == 0 for p in bad)

    def _split(self, a: float, b: float, tol: float, seed: int) -> tuple[float, int] | None:
        """The geometric middle of the widest gap between a, the probes running inside
        (a, b) and b, if that gap is wider than the tolerance."""
        cuts = sorted({a, b, *(lr for lr, _ in self.running if a < lr < b)})
        gaps = [(math.log(hi / lo), lo, hi) for lo, hi in itertools.pairwise(cuts)]
        width, lo, hi = max(gaps)
        if width <= math.log(tol) * (1 + _REL):
            return None
        return (math.sqrt(lo * hi), seed)

    def error(self) -> Probe | None:
        return next((p for p in self.probes if p.outcome == ERROR), None)

    def verdict(self, tol: float, seeds: Sequence[int]) -> Verdict:
        if self.error() is not None:
            return Verdict.ERROR
        lo, hi = self.bracket()

        def all_run(lr: float) -> bool:
            return all(any(p.lr == lr and p.seed == s for p in self.probes) for s in seeds)

        if hi is None and lo == self.high and all_run(self.high):
            return Verdict.STABLE_TO_UPPER
        if hi == self.low and all_run(self.low):
            return Verdict.UNSTABLE_AT_LOWER
        if lo is not None and hi is not None and self._narrow(lo, hi, tol) \
                and all_run(lo) and all_run(hi):
            return Verdict.BRACKETED
        return Verdict.SEARCHING

    def row(self, key: str, tol: float, seeds: Sequence[int]) -> dict[str, Any]:
        """This combo's frontier.parquet row (record/schema.py FRONTIER_SCHEMA)."""
        lo, hi = self.bracket()
        at_hi = self._at(hi) if hi is not None else []
        first_bad = next((p for p in sorted(at_hi, key=lambda p: p.seed)
                          if p.outcome == DIVERGED), None)
        err = self.error()
        return {
            "combo_id": self.id, "combo_json": json.dumps(self.values, sort_keys=True,
                                                          default=str),
            "label": label(self.values), "lr_key": key,
            "verdict": self.verdict(tol, seeds).value, "lr_low": self.low,
            "lr_high": self.high, "stable_lr": lo, "diverged_lr": hi,
            "ratio": hi / lo if lo is not None and hi is not None else None,
            "tolerance": tol,
            "stable_seeds": len({p.seed for p in self._at(lo)}) if lo is not None else None,
            "diverged_seeds": len({p.seed for p in at_hi}) if hi is not None else None,
            "diverged_count": len({p.seed for p in at_hi if p.outcome == DIVERGED})
            if hi is not None else None,
            "divergence_cause": first_bad.cause if first_bad else None,
            "diverged_step": first_bad.step if first_bad else None,
            "nonfinite_module": first_bad.module if first_bad else None,
            "trials": len(self.probes), "trial_steps": sum(p.steps for p in self.probes),
            "error": err.error if err else None,
            "probes_json": json.dumps(sorted([p.lr, p.seed, p.outcome, p.steps]
                                             for p in self.probes)),
            "updated_at": time.time(),
        }


# --- what a finished trial says -----------------------------------------------------------------

def probe_of(config: Mapping[str, Any], result: Mapping[str, Any] | None, key: str,
             errored: bool = False, trial_id: str | None = None) -> Probe:
    """A finished trial's probe: its lr and seed from ``config``, its verdict from the rows
    of its last result (a relay batch; the trial's summary row is the newest)."""
    rows = unpack(result or {})
    last = rows[-1]
    summary = {k: v for row in rows for k, v in row.items() if v is not None}
    if errored or last.get("outcome") == ERROR:
        outcome = ERROR
    elif last.get("outcome") in INFEASIBLE or any(is_diverged(row) for row in rows):
        outcome = DIVERGED  # a collapse (finite, wrecked) is unstable too
    else:
        outcome = COMPLETED
    steps = summary.get("steps_run", summary.get("step", 0))
    seed = config.get(SEED_KEY)
    return Probe(
        lr=float(config[key]), seed=DEFAULT_SEED if seed is None else int(seed),
        outcome=outcome, steps=int(steps or 0),
        cause=summary.get("divergence_cause") if outcome == DIVERGED else None,
        step=summary.get("diverged_step") if outcome == DIVERGED else None,
        module=summary.get("nonfinite_module") if outcome == DIVERGED else None,
        error=(str(summary.get("error") or "trial failed") if outcome == ERROR else None),
        trial_id=trial_id)


def recorded_probes(run_dir: str | os.PathLike[str], key: str,
                    keys: Sequence[str]) -> list[tuple[dict[str, Any], Probe]]:
    """The frontier probes trials.parquet already holds: (combo values, probe) each."""
    from tune_sana.engine.confirm import trial_rows

    out = []
    for row in trial_rows(run_dir):
        if row.get("stage") != STAGE:
            continue
        extra = json.loads(row.get("config_json") or "null") or {}
        config = {k: (row[k] if k in row else extra.get(k)) for k in (key, SEED_KEY, *keys)}
        lr, seed = config.get(key), config.get(SEED_KEY)
        if lr is None:
            continue
        outcome = str(row.get("outcome"))
        outcome = DIVERGED if outcome in INFEASIBLE else outcome  # as probe_of says
        probe = Probe(
            lr=float(lr), seed=DEFAULT_SEED if seed is None else int(seed),
            outcome=outcome if outcome in (COMPLETED, DIVERGED) else ERROR,
            steps=int(row.get("steps_run") or 0), cause=row.get("divergence_cause"),
            step=row.get("diverged_step"), module=row.get("nonfinite_module"),
            error=row.get("error"), trial_id=str(row["trial_id"]))
        out.append(({k: config[k] for k in keys}, probe))
    return out


# --- the Ray Tune searcher ------------------------------------------------------------------------

class FrontierSearcher(Searcher):
    """Proposes the probes of every combo (``Combo.next_probe``), sharing the concurrent slots
    across combos (the combo with the fewest probes running goes first), and says FINISHED when
    every combo has a verdict. Writes frontier.parquet after each probe."""

    def __init__(self, spec: SweepSpec, run_dir: str | None, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._key = lr_key(spec)
        self._keys = combo_keys(spec)
        low, high = spec.space[self._key].loguniform or (0.0, 0.0)
        self._tol = tolerance(spec)
        self._seeds = seeds(spec)
        self._combos = [Combo(values, float(low), float(high)) for values in combos(spec)]
        self._by_id = {c.id: i for i, c in enumerate(self._combos)}  # combo id -> index
        self._issued: dict[str, tuple[int, float, int]] = {}  # trial id -> combo, lr, seed
        self._run_dir = run_dir
        self._spec_yaml = spec.to_yaml()
        self._merged = False  # the record's probes read (on the first suggest or a restore)

    # Ray's hooks ---------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._merged and self._run_dir is not None:
            self.merge_recorded()  # a resumed run whose searcher state was never saved
        if self.finished():
            done: Any = Searcher.FINISHED  # a str, though Ray types suggest's return dict
            return done  # type: ignore[no-any-return]
        candidates = []
        for index, combo in enumerate(self._combos):
            probe = combo.next_probe(self._tol, self._seeds)
            if probe is not None:
                candidates.append((len(combo.running), index, probe))
        if not candidates:
            return None  # waiting for running probes
        _, index, (lr, seed) = min(candidates)
        self._combos[index].running.append((lr, seed))
        self._issued[trial_id] = (index, lr, seed)
        return {self._key: lr, **self._combos[index].values, SEED_KEY: seed}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        issued = self._issued.pop(trial_id, None)
        config = dict((result or {}).get("config") or {})
        if issued is not None:
            index, lr, seed = issued
            config.update({self._key: lr, SEED_KEY: seed, **self._combos[index].values})
        index_of = self._index(config)
        if index_of is None or config.get(self._key) is None:
            return  # not a probe of this search
        combo = self._combos[index_of]
        probe = probe_of(config, result, self._key, errored=error, trial_id=trial_id)
        if (probe.lr, probe.seed) in combo.running:
            combo.running.remove((probe.lr, probe.seed))
        if any(p.trial_id == trial_id for p in combo.probes):
            return  # a trial Ray re-ran after a resume, already counted from the record
        combo.probes.append(probe)
        self.write()

    def finished(self) -> bool:
        return all(c.verdict(self._tol, self._seeds) is not Verdict.SEARCHING
                   for c in self._combos)

    def _index(self, config: Mapping[str, Any]) -> int | None:
        return self._by_id.get(combo_id({k: config.get(k) for k in self._keys}))

    # the record ----------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        return [c.row(self._key, self._tol, self._seeds) for c in self._combos]

    def write(self) -> None:
        """frontier.parquet, rewritten whole (a few rows) and atomically."""
        if self._run_dir is None:
            return
        import pyarrow as pa

        from tune_sana.record.atomic import write_atomic
        from tune_sana.record.schema import FRONTIER_FILE, FRONTIER_SCHEMA, file_metadata
        from tune_sana.record.storage import Location

        table = pa.Table.from_pylist(self.rows(), schema=FRONTIER_SCHEMA.with_metadata(
            file_metadata(self._spec_yaml)))
        write_atomic(table, Location.of(self._run_dir) / FRONTIER_FILE)

    # resume ------------------------------------------------------------------------------------

    def save(self, checkpoint_path: str) -> None:
        state = {"probes": [[c.id, [asdict(p) for p in c.probes]] for c in self._combos],
                 "issued": {tid: list(issued) for tid, issued in self._issued.items()}}
        with open(checkpoint_path, "w") as fh:  # plain values: JSON, never pickle
            json.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        """The saved probes, plus any probe trials.parquet holds that finished after the
        save. Probes that were running stay running: Ray saved its trials in the same
        checkpoint and resumes them (resume_unfinished), so proposing them again would run
        each twice; one the record shows finished is counted from the record instead."""
        with open(checkpoint_path) as fh:
            state = json.load(fh)
        saved = {cid: [Probe(**p) for p in probes] for cid, probes in state["probes"]}
        self._issued = {tid: (int(i), float(lr), int(seed))
                        for tid, (i, lr, seed) in state.get("issued", {}).items()}
        for combo in self._combos:
            combo.probes = saved.get(combo.id, [])
            combo.running = []
        if self._run_dir is not None:
            self.merge_recorded()
        counted = {p.trial_id for combo in self._combos for p in combo.probes}
        for tid, (index, lr, seed) in list(self._issued.items()):
            if tid in counted:
                del self._issued[tid]
            else:
                self._combos[index].running.append((lr, seed))
        self.write()

    def merge_recorded(self) -> None:
        """Add the probes trials.parquet holds that this searcher has not counted."""
        assert self._run_dir is not None
        self._merged = True
        for values, probe in recorded_probes(self._run_dir, self._key, self._keys):
            index = self._index(values)
            if index is None:
                continue
            combo = self._combos[index]
            if not any(p.trial_id == probe.trial_id for p in combo.probes):
                combo.probes.append(probe)


def budget_note(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A line for the end of a frontier search that ran out of trials before every combo had
    a verdict; None when every combo has one."""
    open_ = [r for r in rows if r.get("verdict") == Verdict.SEARCHING.value]
    if not open_:
        return None
    return (f"frontier: {len(open_)} of {len(rows)} combination{'' if len(rows) == 1 else 's'} "
            f"not settled within search.num_samples {spec.search.num_samples} trials; run "
            "again with a larger search.num_samples")
