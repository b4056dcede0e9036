"""Search spaces: YAML -> a validated SweepSpec -> Ray Tune and Optuna distributions.

A space file names the trial program, the metric, the search algorithm, the scheduler, the
resources per trial, the fixed settings and the searched ones::

    trial: sana_finetune
    metric: val_loss
    mode: min
    search: {algorithm: optuna, num_samples: 24, seed: 0, max_concurrent: 2,
             confirm: {top_k: 3, seeds: 2}}
    scheduler: {type: asha, grace_period: 40, reduction_factor: 3}
    resources: {cpu: 1, gpu: 0}
    fixed: {model: demo-base, steps: 120}
    space:
      lr: {loguniform: [1.0e-5, 1.0e-1]}
      precision: {choice: [fp32, fp16-amp, bf16-amp]}
      max_grad_norm: {choice: [null, 1.0]}

Distributions (bounds are explicit; ``loguniform`` and ``uniform`` sample in [low, high),
``int`` is inclusive of both ends, ``log: true`` on ``int`` samples on a log scale):
``loguniform: [low, high]``, ``uniform: [low, high]``, ``int: [low, high]`` (+ ``log``),
``choice: [...]`` (null allowed), ``grid: [...]`` (every value, with algorithm grid or random).
Unknown keys anywhere are errors naming the key and the file. For the trial programs that take a
TrialConfig, every dimension is checked against its key's type: a float range on an integer key
is an error (use ``int``), ``int`` on a float key is fine, both bounds and every choice must be
valid values of the key, and a choice on a true/false key must be true or false. A space with no
key under ``space:`` has nothing to search (every trial would run one configuration): an error
for every algorithm; one configuration is ``tune-sana trial``.

``search.points_to_evaluate`` lists configurations the searcher runs first, in order (Ray's and
Optuna's term): each a mapping of searched keys to values of their dimensions; a key a point
leaves out is drawn as usual. They count inside ``num_samples`` (optuna and random; grid runs
every combination and takes none). ``search.confirm`` (off when absent) re-runs the best
``top_k`` configurations of the search with ``seeds`` fresh seeds each (engine/confirm.py).
"""

from __future__ import annotations

import builtins
import importlib.resources
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tune_sana.config import (
    TRIAL_KEYS,
    TrialConfig,
    UserError,
    build_config,
    did_you_mean,
    read_yaml_mapping,
)

TRIALS: dict[str, str] = {
    "sana_finetune": "trials.sana_finetune:run",
    "synthetic": "trials.synthetic:run",
}
# Trials that take a validated TrialConfig; any other trial program gets its config as a dict.
TRIAL_CONFIG_TRIALS = frozenset({"sana_finetune"})
# What each trial program reports that a search can rank on (metric:); Ray's strict metric
# check is off (rows between evaluations carry no val_loss), so a name no trial reports would
# rank nothing, silently.
METRICS: dict[str, tuple[str, ...]] = {
    "sana_finetune": ("val_loss", "retain_loss", "train_loss"),
    "synthetic": ("val_loss", "train_loss"),
}
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfirmSpec(_Strict):
    """The confirm stage: after the search, its best configurations re-run with fresh seeds."""

    top_k: int = Field(3, ge=1, description="distinct configurations re-run, best first")
    seeds: int = Field(2, ge=1, description="fresh seeds (unused by the search) per configuration")


class FrontierSpec(_Strict):
    """The frontier search (engine/frontier.py): how narrow a bracket, how many seeds."""

    tolerance: float = Field(1.25, gt=1, description="bracket ratio diverged_lr / stable_lr "
                             "to reach")
    seeds: int = Field(2, ge=1, description="trial seeds run at both ends of the final bracket")


class SearchSpec(_Strict):
    """How configurations are proposed."""

    algorithm: Literal["random", "grid", "optuna", "frontier"] = "optuna"
    num_samples: int = Field(16, ge=1, description="trials to run (grid: repeats of the grid)")
    seed: int = Field(0, ge=0, description="seeds the searcher, so a sweep repeats")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    points_to_evaluate: list[dict[str, Any]] | None = Field(
        None, description="configurations run first, in order (searched keys; the others are "
        "drawn); counted in num_samples")
    confirm: ConfirmSpec | None = Field(None, description="re-run the best configurations "
                                        "with fresh seeds after the search (off when absent)")
    frontier: FrontierSpec | None = Field(None, description="settings of algorithm frontier "
                                          "(defaults when absent)")
    max_diverged: int | float | None = Field(
        None, description="failure budget (off when absent): the search stops early once this "
        "many trials diverged (a whole number >= 1), or once this share of the finished trials "
        "diverged (a fraction in (0, 1), applied from 5 finished trials on); finished trials "
        "are kept and tune-sana sweep exits with status 3 (engine/budget.py)")

    @field_validator("max_diverged", mode="before")
    @classmethod
    def _count_or_fraction(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is neither a count >= 1 nor a fraction in (0, 1)")
        if 0 < value < 1:
            return float(value)
        if value >= 1 and float(value).is_integer():
            return int(value)  # a count (sweep.yaml then writes 3, not 3.0)
        raise ValueError(f"{value!r} is neither a whole count >= 1 (e.g. 5) nor a fraction in "
                         "(0, 1) (e.g. 0.8)")


class SchedulerSpec(_Strict):
    """Early stopping of slow-but-finite trials, on the validation metric."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(50, ge=1, description="steps a trial runs before it can be pruned")
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the trial's steps")


PARALLEL_MODES = ("ddp", "fsdp")
# What the Tune trial of a multi-worker trial holds for itself: it only starts the trainer and
# waits (Ray Train's workers hold resources.cpu/gpu/custom each).
TRAINER_CPU = 0.1


class ResourcesSpec(_Strict):
    """Per trial, or per worker of a multi-worker trial (``workers`` > 1: a Ray Train
    TorchTrainer inside the Tune trial, engine/workers.py). Fractional GPUs pack several trials
    onto one GPU (Ray does not limit memory)."""

    workers: int = Field(1, ge=1, le=1024, description="processes per trial (one per GPU)")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="how workers share the model: ddp (replicas) or fsdp (FSDP2 shards, "
        "for models that do not fit on one device)")
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    custom: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per trial (per worker), e.g. "
        "{worker_node: 1} to place trials on nodes started with --resources")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of one GPU (GiB) for preflight's fit check; null = "
        "read it from the driver's first GPU (no check where it has none)")


class Dimension(_Strict):
    """One searched key: exactly one distribution."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None
    log: bool = False
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> Dimension:
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            names = ", ".join(DISTRIBUTIONS)
            raise ValueError(f"give exactly one of {names} (got {given or 'none'})")
        kind = given[0]
        if kind in ("loguniform", "uniform", "int"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(
                    f"{kind} range [{low}, {high}] is empty or inverted; need low < high")
            if (kind == "loguniform" or self.log) and low <= 0:
                raise ValueError(f"{kind} on a log scale needs low > 0 (got {low})")
        if self.log and kind != "int":
            raise ValueError("'log' applies to int only; use loguniform for floats")
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DISTRIBUTIONS if getattr(self, d) is not None)

    def values(self) -> list[Any]:
        """Every value a choice/grid can take (for validation)."""
        return list(self.choice or self.grid or [])

    def extremes(self) -> list[Any]:
        """Every choice/grid value, or both ends of a range: the values a check that must
        hold across the dimension tries."""
        return self.values() if self.kind in ("choice", "grid") else list(getattr(self, self.kind))


class SweepSpec(_Strict):
    """A whole sweep, as loaded from a space file plus ``--set`` overrides."""

    trial: str = "sana_finetune"
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    max_retries: int = Field(
        2, ge=0, description="retries of a trial whose process died (from its last checkpoint); "
        "a trial that raised or diverged is never retried")
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dimension] = Field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def builtin_space_path(name: str) -> Path:
    """search_spaces/<name>.yaml shipped with the package."""
    root = importlib.resources.files("search_spaces")
    return Path(str(root.joinpath(f"{name}.yaml")))


def _locate(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def parse_spec(raw: Mapping[str, Any], source: str, *, fixed_by_set: Collection[str] = ()
               ) -> SweepSpec:
    """Validate a mapping; every problem is a UserError naming the key and ``source``.

    ``fixed_by_set``: the searched keys that ``--set`` moved to ``fixed`` (named in the error
    when nothing is left to search).
    """
    top = set(SweepSpec.model_fields)
    for key in raw:
        if key not in top:
            raise UserError(f"{source}: unknown key '{key}'{did_you_mean(key, top)}; "
                            f"valid top-level keys: {', '.join(sorted(top))}")
    # ``space:`` or ``fixed:`` with nothing under it is YAML's null: an empty section.
    raw = {k: v for k, v in raw.items() if not (k in ("fixed", "space") and v is None)}
    try:
        spec = SweepSpec(**raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = _locate(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            section = _locate(first["loc"][:-1])
            bad = str(first["loc"][-1])
            sections: dict[str, type[BaseModel]] = {
                "search": SearchSpec, "search.confirm": ConfirmSpec,
                "search.frontier": FrontierSpec, "scheduler": SchedulerSpec,
                "resources": ResourcesSpec}
            model = sections.get(section, sections.get(section.split(".")[0], Dimension))
            valid = DISTRIBUTIONS if model is Dimension else tuple(model.model_fields)
            raise UserError(f"{source}: unknown key '{loc}'{did_you_mean(bad, valid)}; "
                            f"valid here: {', '.join(valid)}") from None
        raise UserError(f"{source}: key '{loc}': {msg}") from None
    _check_against_trial(spec, source)
    _check_searchable(spec, source, fixed_by_set)
    _check_points(spec, source)
    _check_frontier(spec, source)
    return spec


def _check_frontier(spec: SweepSpec, source: str) -> None:
    """What a frontier search needs of a space (engine/frontier.py); search.frontier without
    it is a mistake worth naming."""
    if spec.search.algorithm != "frontier":
        if spec.search.frontier is not None:
            raise UserError(f"{source}: search.frontier applies to search.algorithm frontier "
                            f"(this is {spec.search.algorithm}); drop it or set the algorithm")
        return
    where = f"{source}: search.algorithm frontier"
    logs = [k for k, d in spec.space.items() if d.kind == "loguniform"]
    if len(logs) != 1:
        raise UserError(f"{where} bisects one loguniform key (the learning rate); the space has "
                        f"{len(logs)} ({', '.join(logs) or 'none'}); give exactly one, e.g. "
                        "lr: {loguniform: [1.0e-5, 1.0]}")
    loose = [k for k, d in spec.space.items() if d.kind in ("uniform", "int")]
    if loose:
        raise UserError(f"{where}: space.{loose[0]} is {spec.space[loose[0]].kind}; every key "
                        "but the learning rate must be a choice (the combinations to map); "
                        "make it a choice or move it to fixed")
    if spec.scheduler.type != "fifo":
        raise UserError(f"{where} judges every trial over its whole step budget, but "
                        f"scheduler.type is {spec.scheduler.type} (it would prune finite "
                        "trials); set scheduler: {type: fifo}")
    for key, why in (("points_to_evaluate", "it chooses every trial itself"),
                     ("confirm", "it has no best configuration to confirm")):
        if getattr(spec.search, key):
            raise UserError(f"{where}: {why}; drop search.{key}")
    if "seed" in spec.space:
        raise UserError(f"{where} runs its own seeds (search.frontier.seeds); drop space.seed")


def _check_searchable(spec: SweepSpec, source: str, fixed_by_set: Collection[str]) -> None:
    """A sweep searches at least one key. With none, optuna has no space to sample (Ray raises
    once the sweep has started) and random or grid run one configuration num_samples times."""
    if spec.space:
        return
    if fixed_by_set:
        keys = ", ".join(sorted(fixed_by_set))
        what = "the only searched key" if len(fixed_by_set) == 1 else "every searched key"
        why = f"--set {keys} fixed {what}"
    else:
        why = "no key under space:"
    one = ("or run one configuration with tune-sana trial (--config FILE or --set key=value)"
           if spec.trial in TRIAL_CONFIG_TRIALS
           else "or, for one configuration, give one key a one-value grid (seed: {grid: [0]})")
    raise UserError(f"{source}: nothing to search: {why}; add a key under space: (e.g. lr: "
                    f"{{loguniform: [1.0e-5, 1.0e-2]}}), {one}")


def _check_against_trial(spec: SweepSpec, source: str) -> None:
    if spec.trial not in TRIALS:
        hint = did_you_mean(spec.trial, TRIALS)
        raise UserError(f"{source}: unknown trial '{spec.trial}'{hint}; "
                        f"known trials: {', '.join(TRIALS)}")
    metrics = METRICS.get(spec.trial)
    if metrics is not None and spec.metric not in metrics:
        raise UserError(f"{source}: metric '{spec.metric}'{did_you_mean(spec.metric, metrics)}: "
                        f"trial '{spec.trial}' reports {', '.join(metrics)}; use one of them")
    if spec.trial not in TRIAL_CONFIG_TRIALS:
        return
    for section in ("fixed", "space"):
        for key in getattr(spec, section):
            if key not in TRIAL_KEYS:
                raise UserError(f"{source}: unknown key '{section}.{key}'"
                                f"{did_you_mean(key, TRIAL_KEYS)}; valid trial keys: "
                                f"{', '.join(TRIAL_KEYS)}")
    both = set(spec.fixed) & set(spec.space)
    if both:
        raise UserError(f"{source}: '{sorted(both)[0]}' is both fixed and searched; keep one")
    build_config(spec.fixed, source=f"{source}: fixed")
    for key, dim in spec.space.items():
        where = f"{source}: space.{key}"
        _check_kind(key, dim, where)
        for value in dim.extremes():  # every choice; both ends of a range
            problem = _type_problem(key, value)
            if problem:
                raise UserError(f"{where}: {problem}")
            build_config({**spec.fixed, key: value}, source=where)
    if spec.search.algorithm == "optuna" and any(d.kind == "grid" for d in spec.space.values()):
        raise UserError(f"{source}: 'grid' needs search.algorithm grid or random; "
                        "with optuna use 'choice'")
    if spec.search.algorithm == "grid" and any(d.kind != "grid" for d in spec.space.values()):
        loose = next(k for k, d in spec.space.items() if d.kind != "grid")
        raise UserError(f"{source}: search.algorithm grid needs every space key as grid "
                        f"('{loose}' is not); or use algorithm random")


def _check_points(spec: SweepSpec, source: str) -> None:
    """search.points_to_evaluate: searched keys only, each value one its dimension can take,
    no more points than num_samples, and (for a TrialConfig trial) a valid configuration."""
    points = spec.search.points_to_evaluate or []
    if not points:
        return
    where = f"{source}: search.points_to_evaluate"
    if spec.search.algorithm == "grid":
        raise UserError(f"{where}: algorithm grid runs every combination of its grid and takes no "
                        "points; use search.algorithm random or optuna, or drop the points")
    if len(points) > spec.search.num_samples:
        raise UserError(f"{where}: {len(points)} points but search.num_samples is "
                        f"{spec.search.num_samples} (the points count inside it); raise "
                        f"num_samples to at least {len(points)} or drop points")
    searched = ", ".join(spec.space)
    for index, point in enumerate(points):
        at = f"{where}[{index}]"
        if not point:
            raise UserError(f"{at}: an empty point; give searched keys and their values, e.g. "
                            f"{{{next(iter(spec.space))}: ...}}, or drop it")
        for key, value in point.items():
            if key in spec.fixed:
                raise UserError(f"{at}: '{key}' is fixed, not searched; drop it from the point "
                                "(or search it under space:)")
            if key not in spec.space:
                raise UserError(f"{at}: '{key}' is not a searched key"
                                f"{did_you_mean(key, spec.space)}; a point sets keys under "
                                f"space: ({searched})")
            problem = _point_problem(key, spec.space[key], value,
                                     typed=spec.trial in TRIAL_CONFIG_TRIALS)
            if problem:
                raise UserError(f"{at}.{key}: {problem}")
        if spec.trial in TRIAL_CONFIG_TRIALS:
            build_config({**spec.fixed, **point}, source=at)


_NO_MATCH = object()


def _matching_choice(value: Any, choices: list[Any]) -> Any:
    """The element of ``choices`` equal to ``value`` (1 matches 1.0, but not true), else
    _NO_MATCH."""
    for choice in choices:
        if value is None or choice is None:
            if value is choice:
                return choice
        elif isinstance(value, bool) == isinstance(choice, bool) and value == choice:
            return choice
    return _NO_MATCH


def _point_problem(key: str, dim: Dimension, value: Any, typed: bool) -> str | None:
    """What is wrong with ``value`` as ``key``'s value in a point, with the fix; None if fine."""
    problem = _type_problem(key, value) if typed else None
    if problem:
        return problem
    if dim.kind in ("choice", "grid"):
        if _matching_choice(value, dim.values()) is _NO_MATCH:
            listed = ", ".join("null" if v is None else str(v) for v in dim.values())
            return f"{value!r} is not one of space.{key}'s values ({listed}); use one of them"
        return None
    low, high = getattr(dim, dim.kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number; space.{key} is {dim.kind} [{low:g}, {high:g}]"
    if dim.kind == "int" and not isinstance(value, int):
        return f"{value!r} is not a whole number; space.{key} is int [{low}, {high}]"
    if not low <= value <= high:
        return (f"{value!r} is outside space.{key}'s {dim.kind} range [{low:g}, {high:g}]; "
                "use a value within it")
    return None


def starting_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """search.points_to_evaluate for the searcher: a choice or grid value replaced by the
    dimension's own element (a point's 1 is the choice 1.0), so the searcher knows it."""
    out = []
    for point in spec.search.points_to_evaluate or []:
        resolved = {}
        for key, value in point.items():
            dim = spec.space[key]
            resolved[key] = (_matching_choice(value, dim.values())
                             if dim.kind in ("choice", "grid") else value)
        out.append(resolved)
    return out


def search_trials(spec: SweepSpec) -> int:
    """The trials a finished search has run: num_samples for optuna (and at most that for
    frontier, which ends by itself); for random and grid each sample runs every combination of
    the grid keys (Ray's variant generator), and a starting point runs every combination of the
    grid keys it leaves out."""
    if spec.search.algorithm in ("optuna", "frontier"):
        return spec.search.num_samples

    def combinations(keys: Collection[str]) -> int:
        count = 1
        for key in keys:
            count *= len(spec.space[key].values())
        return count

    grid_keys = [k for k, d in spec.space.items() if d.kind == "grid"]
    points = spec.search.points_to_evaluate or []
    from_points = sum(combinations([k for k in grid_keys if k not in p]) for p in points)
    return from_points + (spec.search.num_samples - len(points)) * combinations(grid_keys)


def _key_type(key: str) -> type | None:
    """bool, int or float for a TrialConfig key of that type (null allowed or not); None for
    the others (strings, enums), whose values pydantic checks strictly enough."""
    annotation = TrialConfig.model_fields[key].annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {a for a in (typing.get_args(annotation) if union else (annotation,))
             if a is not type(None)}
    return next((t for t in (bool, int, float) if kinds == {t}), None)


def _check_kind(key: str, dim: Dimension, where: str) -> None:
    """A range's kind against the key's type: floats only on float keys, ints on numbers."""
    if dim.kind in ("choice", "grid"):
        return
    key_type = _key_type(key)
    if key_type is float or (key_type is int and dim.kind == "int"):
        return
    if key_type is bool:
        raise UserError(f"{where}: {dim.kind} draws numbers but '{key}' is true or false; "
                        "use choice: [false, true]")
    if key_type is None:
        raise UserError(f"{where}: {dim.kind} draws numbers but '{key}' is not a number; "
                        "use choice: [...] of its values")
    low, high = getattr(dim, dim.kind)
    bounds = (f"[{int(low)}, {int(high)}]"
              if float(low).is_integer() and float(high).is_integer() else "[low, high]")
    log = ", log: true" if dim.kind == "loguniform" else ""
    raise UserError(f"{where}: {dim.kind} draws floats but '{key}' is an integer; "
                    f"use int: {bounds}{log}")


def _type_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value``'s type for ``key`` where pydantic would convert it
    silently (0/1 or "yes" for a bool, 10.0 for an int, true or "1.0" for a float)."""
    key_type = _key_type(key)
    if value is None or key_type is None:
        return None
    if key_type is bool:
        return None if isinstance(value, bool) else f"{value!r} is not true or false; use those"
    if key_type is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer; use whole numbers (10, not 10.0)"
    if key_type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{value!r} is not a number; use numbers, unquoted (1.0e-3)"
    return None


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``--set``: a trial key goes to ``fixed`` (and leaves ``space``); a dotted key such as
    ``search.num_samples`` sets that section's field."""
    # A deep copy of plain data, in the file's key order (a frontier's labels follow it).
    out = yaml.safe_load(yaml.safe_dump(raw, sort_keys=False))
    for key, value in overrides.items():
        if "." in key:
            _set_path(out, key, value)
        else:
            out.setdefault("fixed", {})[key] = value
            (out.get("space") or {}).pop(key, None)
    return dict(out)


def read_space_file(path: str | Path) -> dict[str, Any]:
    """Read a space file with the safe YAML loader; errors name the file."""
    file = Path(path)
    if not file.is_file():
        hint = ""
        if not file.suffix and builtin_space_path(str(path)).is_file():
            hint = f" (did you mean the built-in space: {builtin_space_path(str(path))}?)"
        raise UserError(f"{path}: no such space file{hint}")
    return read_yaml_mapping(file, "a mapping (trial:, fixed:, space:, ...)")


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Load a space file (None: the built-in quickstart), apply overrides, validate."""
    file = Path(path) if path is not None else builtin_space_path("quickstart")
    given = read_space_file(file)
    raw = apply_overrides(given, overrides or {})
    searched = given.get("space")
    searched_keys = set(searched) if isinstance(searched, dict) else set()
    fixed_by_set = [key for key in overrides or {} if key in searched_keys]
    return parse_spec(raw, source=str(file), fixed_by_set=fixed_by_set)


def max_t(spec: SweepSpec) -> int:
    """The scheduler's horizon in steps: scheduler.max_t, else the most steps a trial runs."""
    if spec.scheduler.max_t is not None:
        return spec.scheduler.max_t
    if "steps" in spec.space:
        dim = spec.space["steps"]
        if dim.kind in ("choice", "grid"):
            counts = [int(v) for v in dim.values() if isinstance(v, (int, float))]
        else:
            counts = [int(getattr(dim, dim.kind)[1])]
        if counts:
            return max(counts)
    return int(spec.fixed.get("steps", TrialConfig.model_fields["steps"].default))


# --- conversion --------------------------------------------------------------------------------

def ray_space(spec: SweepSpec) -> dict[str, Any]:
    """The param_space for Tuner (random and grid search)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if dim.loguniform is not None:
            out[key] = tune.loguniform(*dim.loguniform)
        elif dim.uniform is not None:
            out[key] = tune.uniform(*dim.uniform)
        elif dim.int is not None:
            low, high = dim.int
            out[key] = tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
        elif dim.choice is not None:
            out[key] = tune.choice(dim.choice)
        else:
            out[key] = tune.grid_search(dim.values())
    return out


def optuna_space(spec: SweepSpec) -> dict[str, Any]:
    """Optuna distributions (low/high inclusive in Optuna; a float ``high`` is rarely drawn)."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if dim.loguniform is not None:
            out[key] = od.FloatDistribution(*dim.loguniform, log=True)
        elif dim.uniform is not None:
            out[key] = od.FloatDistribution(*dim.uniform)
        elif dim.int is not None:
            out[key] = od.IntDistribution(*dim.int, log=dim.log)
        else:
            out[key] = od.CategoricalDistribution(dim.values())
    return out
