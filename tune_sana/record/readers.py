"""Reading the record with pyarrow: trials.parquet, the history dataset, file metadata, and
the run's spec (sweep.yaml), each read here and nowhere else.

A file that cannot be read (truncated by a copy, overwritten with garbage) is a
:class:`CorruptFile`: a one-line UserError naming it. Inside :func:`skipping_corrupt` the
readers leave such files out instead (a corrupt trials.parquet reads as no finished trial, a
corrupt history part as no rows, a corrupt frontier.parquet as none, a corrupt sweep.yaml as
the copy of the spec in trials.parquet's metadata) and note each one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from tune_sana.config import UserError
from tune_sana.record.schema import (
    FRONTIER_FILE,
    FRONTIER_SCHEMA,
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SPEC_FILE,
    TRIALS_FILE,
    TRIALS_SCHEMA,
)
from tune_sana.record.storage import Location

# The trial program a spec runs when it names none (SweepSpec's default).
DEFAULT_TRIAL = "sana_finetune"
_SPEC_KEY = "tune_sana.spec"
_RESTORE = "restore it from a copy of the run"


class CorruptFile(UserError):
    """A file of the record that cannot be read: ``location`` names it, ``reason`` says why."""

    def __init__(self, location: Location, reason: str, fix: str = _RESTORE,
                 name: str | None = None) -> None:
        super().__init__(f"{name or location}: {reason}; {fix}")
        self.location, self.reason = location, reason


_skipped: ContextVar[list[CorruptFile] | None] = ContextVar("skipped", default=None)


@contextlib.contextmanager
def skipping_corrupt(skip: bool = True) -> Iterator[list[CorruptFile]]:
    """While the block runs (and ``skip``), the readers leave corrupt files out, as the module
    says, instead of raising; the list it yields gets each one left out, once."""
    found: list[CorruptFile] = []
    token = _skipped.set(found if skip else None)
    try:
        yield found
    finally:
        _skipped.reset(token)


def _corrupt(err: CorruptFile) -> None:
    """Raise ``err``, or inside :func:`skipping_corrupt` note it and return."""
    found = _skipped.get()
    if found is None:
        raise err
    if all(f.location.path != err.location.path for f in found):
        found.append(err)


def _why(err: BaseException) -> str:
    """pyarrow's reason, short: its first sentence, without the path it repeats."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = text.split("': ", 1)[-1] if text.startswith("Could not open") else text
    text = text.split(". ", 1)[0].rstrip(".")
    return text if len(text) <= 120 else text[:117] + "..."


_UNREADABLE = (pa.ArrowException, OSError)  # pyarrow's errors for a torn or foreign file


def _unreadable(location: Location, err: BaseException, fix: str = _RESTORE) -> CorruptFile:
    return CorruptFile(location, f"corrupt Parquet file ({_why(err)})", fix)


def _read_table(location: Location, columns: list[str] | None = None) -> pa.Table | None:
    """The Parquet file at ``location``; None where it is corrupt and skipped."""
    try:
        return location.read_table(columns=columns)
    except _UNREADABLE as err:
        _corrupt(_unreadable(location, err))
        return None


def _read_schema(location: Location) -> pa.Schema | None:
    """The Parquet file's schema (its footer); None where it is corrupt and skipped."""
    try:
        return location.read_schema()
    except _UNREADABLE as err:
        _corrupt(_unreadable(location, err))
        return None


def _require_run_dir(run_dir: Location) -> None:
    if not (run_dir / TRIALS_FILE).is_file() and not (run_dir / HISTORY_DIR).is_dir():
        raise UserError(
            f"{run_dir}: not a tune-sana run directory (no {TRIALS_FILE} or {HISTORY_DIR}/); "
            "pass the folder that tune-sana sweep printed"
        )


def read_trials(run_dir: str | os.PathLike[str] | Location,
                columns: list[str] | None = None) -> pa.Table:
    """trials.parquet (an empty TRIALS_SCHEMA table while no trial has finished, or where the
    file is corrupt and skipped). ``run_dir``: a local folder or a URI. CorruptFile where the
    file cannot be read."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    path = folder / TRIALS_FILE
    table = _read_table(path, columns) if path.is_file() else None
    if table is None:
        empty = TRIALS_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    return table


def read_trial_columns(run_dir: str | os.PathLike[str] | Location,
                       columns: Sequence[str]) -> pa.Table:
    """``columns`` of trials.parquet, read with projection. A column the file lacks (written
    before a TrialConfig field or summary column existed) comes back as nulls of its
    TRIALS_SCHEMA type, so files of older versions still read."""
    folder = Location.of(run_dir)
    path = folder / TRIALS_FILE
    schema = _read_schema(path) if path.is_file() else None
    present = set(schema.names) if schema is not None else set(TRIALS_SCHEMA.names)
    table = read_trials(folder, [c for c in columns if c in present])
    for name in columns:
        if name not in present:
            column = TRIALS_SCHEMA.field(name)
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(list(columns))


_PART_FIX = ("tune-sana resume moves it into quarantine/; tune-sana report --skip-corrupt "
             "reports the rest")


def corrupt_parts(run_dir: str | os.PathLike[str] | Location) -> list[CorruptFile]:
    """The history parts that cannot be read whole (every page of every column read, one part
    at a time), in name order."""
    folder = Location.of(run_dir)
    bad = []
    for part in (folder / HISTORY_DIR).entries(suffix=".parquet", dirs=False):
        try:
            part.read_table()
        except _UNREADABLE as err:
            bad.append(_unreadable(part, err, _PART_FIX))
    return bad


def read_history(run_dir: str | os.PathLike[str] | Location, columns: list[str] | None = None,
                 trial_ids: Sequence[str] | None = None) -> pa.Table:
    """All history rows (column projection and a trial filter pushed into the scan).
    CorruptFile naming the first part that cannot be read; inside :func:`skipping_corrupt`,
    the rows of the parts that can."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    files = [f.path for f in (folder / HISTORY_DIR).entries(suffix=".parquet", dirs=False)]
    try:
        return _scan(folder, files, columns, trial_ids)
    except _UNREADABLE:
        bad = corrupt_parts(folder)
        if not bad:
            raise  # not a corrupt part: a bug, with its traceback
    for err in bad:
        _corrupt(err)
    left_out = {err.location.path for err in bad}
    return _scan(folder, [f for f in files if f not in left_out], columns, trial_ids)


def _scan(folder: Location, files: list[str], columns: list[str] | None,
          trial_ids: Sequence[str] | None) -> pa.Table:
    if not files:
        empty = HISTORY_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    dataset = ds.dataset(files, schema=HISTORY_SCHEMA, format="parquet", filesystem=folder.fs)
    flt = ds.field("trial_id").isin(list(trial_ids)) if trial_ids is not None else None
    return dataset.to_table(columns=columns, filter=flt)


def read_frontier(run_dir: str | os.PathLike[str] | Location) -> pa.Table | None:
    """frontier.parquet of a frontier search (one row per combination), or None for a run
    that has none (or whose file is corrupt and skipped). Columns as FRONTIER_SCHEMA."""
    path = Location.of(run_dir) / FRONTIER_FILE
    table = _read_table(path) if path.is_file() else None
    if table is None:
        return None
    for column in FRONTIER_SCHEMA:  # a column a later version added comes back as nulls
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(FRONTIER_SCHEMA.names)


def read_metadata(path: str | os.PathLike[str] | Location) -> dict[str, str]:
    """The tune_sana.* metadata of one Parquet file (a local path or a URI); ``{}`` where the
    file is corrupt and skipped."""
    schema = _read_schema(Location.of(path))
    raw = schema.metadata if schema is not None else None
    return {k.decode(): v.decode() for k, v in (raw or {}).items()
            if k.startswith(b"tune_sana.")}


# --- the run's spec --------------------------------------------------------------------------

_SPEC_FIX = "restore the file the sweep wrote"


def _recorded_spec(folder: Location) -> str:
    """The copy of the spec in trials.parquet's metadata ('' where there is none, or the file
    cannot be read: its own reader names it)."""
    trials_file = folder / TRIALS_FILE
    if not trials_file.is_file():
        return ""
    try:
        raw: dict[bytes, bytes] = trials_file.read_schema().metadata or {}
    except _UNREADABLE:
        return ""
    return raw.get(_SPEC_KEY.encode(), b"").decode(errors="replace")


def _spec_text(spec_file: Location, recorded: str) -> str:
    """sweep.yaml's text; CorruptFile where it is not text, or is a truncated copy of the spec
    that trials.parquet recorded (a copy cut short can still be valid YAML)."""
    try:
        text = spec_file.read_text()
    except UnicodeDecodeError:
        raise CorruptFile(spec_file, "corrupt: not UTF-8 text", _SPEC_FIX) from None
    if recorded and text != recorded and recorded.startswith(text):
        raise CorruptFile(spec_file, "truncated: it is the start of the spec recorded in "
                          f"{TRIALS_FILE}", _SPEC_FIX)
    return text


def _parse_spec(text: str, location: Location, name: str) -> dict[str, Any]:
    """The spec mapping of ``text`` (``{}`` for an empty text); CorruptFile (as ``name``) for
    malformed YAML or a top level that is not a mapping."""
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise CorruptFile(location, f"malformed YAML{at}", _SPEC_FIX, name) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise CorruptFile(location, "expected a mapping (trial:, fixed:, space:, ...) at the top "
                          "level", _SPEC_FIX, name)
    return loaded


def _read_spec(folder: Location) -> tuple[dict[str, Any], str]:
    """(the spec mapping, where it was read from) for :func:`read_spec`."""
    spec_file, trials_file = folder / SPEC_FILE, folder / TRIALS_FILE
    recorded = _recorded_spec(folder)
    if spec_file.is_file():
        try:
            text = _spec_text(spec_file, recorded)
            return _parse_spec(text, spec_file, str(spec_file)), str(spec_file)
        except CorruptFile as err:
            _corrupt(err)  # skipped: the copy in trials.parquet, if there is one
    if recorded:
        source = f"{trials_file} (the spec in its metadata)"
        return _parse_spec(recorded, trials_file, source), source
    return {}, str(spec_file)


def read_spec(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The run's spec as the raw mapping the sweep wrote (not validated against the trial).

    Read from ``<run dir>/sweep.yaml``; where that file is missing (or corrupt and skipped),
    from the copy of the spec in trials.parquet's metadata; ``{}`` when neither exists (an empty
    file is ``{}`` too). Malformed YAML, YAML whose top level is not a mapping, bytes that are
    not text, or a sweep.yaml that is a truncated copy of the recorded spec is a one-line
    CorruptFile naming the file. ``run_dir``: a local folder or a URI.
    """
    return _read_spec(Location.of(run_dir))[0]


@dataclass(frozen=True)
class RunSpec:
    """The parts of a run's spec that say what its trials ran with.

    ``fixed``: the spec's ``fixed:`` block as written; a null value is a setting like any other
    (``loss_spike_factor: null`` turns the spike check off), not a missing one. ``searched``:
    the keys of ``space:``; a trial's recorded value of a searched key is its setting even when
    null (``max_grad_norm: null`` is a choice: clipping off). ``trial``: the trial program's
    name (``sana_finetune`` when the spec names none). ``source``: where the spec was read,
    for messages.
    """

    fixed: dict[str, Any] = field(default_factory=dict)
    searched: frozenset[str] = frozenset()
    trial: str = DEFAULT_TRIAL
    source: str = SPEC_FILE

    @classmethod
    def of(cls, raw: Mapping[str, Any], source: str = SPEC_FILE) -> RunSpec:
        """The view of a spec mapping (as :func:`read_spec` returns it); a missing or null
        ``fixed:`` / ``space:`` is empty. UserError naming ``source`` where ``fixed:`` or
        ``space:`` is not a mapping or ``trial:`` not a name."""
        fixed, space = raw.get("fixed") or {}, raw.get("space") or {}
        trial = raw.get("trial") or DEFAULT_TRIAL
        for key, value in (("fixed", fixed), ("space", space)):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: '{key}' must be a mapping of key: value; restore "
                                "the file the sweep wrote")
        if not isinstance(trial, str):
            raise UserError(f"{source}: 'trial' must be a trial program's name; restore the "
                            "file the sweep wrote")
        return cls(dict(fixed), frozenset(str(k) for k in space), trial, source)


def read_run_spec(run_dir: str | os.PathLike[str] | Location) -> RunSpec:
    """:func:`read_spec` as a :class:`RunSpec` (an empty one when the run has no spec)."""
    raw, source = _read_spec(Location.of(run_dir))
    return RunSpec.of(raw, source)
