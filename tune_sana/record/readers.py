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
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import yaml

from tune_sana.config import UserError
from tune_sana.record.schema import (
    COMPACT_PREFIX,
    COVERS_KEY,
    FRONTIER_FILE,
    FRONTIER_SCHEMA,
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SPEC_FILE,
    TRIALS_FILE,
    TRIALS_PARTS_DIR,
    TRIALS_SCHEMA,
)
from tune_sana.record.storage import Location

_T = TypeVar("_T")
# Files per pyarrow scan of trial parts: many tiny files in one scan hold ~0.25 MB each.
_SCAN_FILES = 128
# How often a reader lists the files again when a compaction deleted one it had listed.
_RETRIES = 20

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
    """The Parquet file at ``location``; None where it is corrupt and skipped.
    FileNotFoundError where it is gone (a compaction deleted it after it was listed)."""
    try:
        return location.read_table(columns=columns)
    except FileNotFoundError:
        raise
    except _UNREADABLE as err:
        _corrupt(_unreadable(location, err))
        return None


def _read_schema(location: Location) -> pa.Schema | None:
    """The Parquet file's schema (its footer); None where it is corrupt and skipped."""
    try:
        return location.read_schema()
    except FileNotFoundError:
        raise
    except _UNREADABLE as err:
        _corrupt(_unreadable(location, err))
        return None


def covers(metadata: Mapping[bytes, bytes] | None) -> frozenset[str]:
    """The part file names a compacted file's metadata says it holds (none where it says
    nothing)."""
    raw = (metadata or {}).get(COVERS_KEY)
    return frozenset(json.loads(raw)) if raw else frozenset()


def _retrying(read: Callable[[], _T]) -> _T:
    """``read()``, again while a file it listed vanished under it: a compaction renamed its
    file into place and deleted the parts it holds between the listing and the read. The next
    listing sees the compacted file, so the retried read is whole again."""
    for _ in range(_RETRIES - 1):
        try:
            return read()
        except FileNotFoundError:
            continue
    return read()


def trials_recorded(run_dir: str | os.PathLike[str] | Location) -> bool:
    """Whether any trial has finished: trials.parquet or a trial part exists."""
    folder = Location.of(run_dir)
    return ((folder / TRIALS_FILE).is_file()
            or bool((folder / TRIALS_PARTS_DIR).entries(suffix=".parquet", dirs=False)))


def _require_run_dir(run_dir: Location) -> None:
    if not (run_dir / TRIALS_FILE).is_file() and not (run_dir / HISTORY_DIR).is_dir():
        raise UserError(
            f"{run_dir}: not a tune-sana run directory (no {TRIALS_FILE} or {HISTORY_DIR}/); "
            "pass the folder that tune-sana sweep printed"
        )


def read_trials(run_dir: str | os.PathLike[str] | Location,
                columns: list[str] | None = None) -> pa.Table:
    """Every finished trial, once: trials.parquet and the trial parts written since it was
    last compacted (trials_parts/; those its metadata covers are skipped), a trial in both
    as its newest row. An empty TRIALS_SCHEMA table while no trial has finished, or where the
    files are corrupt and skipped. ``run_dir``: a local folder or a URI. CorruptFile where a
    file cannot be read.

    The parts are listed before trials.parquet is read, so a compaction running meanwhile is
    seen either not at all or whole (a part it deleted after the listing: listed again)."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    return _retrying(lambda: _read_trials_once(folder, columns))


def _read_trials_once(folder: Location, columns: list[str] | None) -> pa.Table:
    parts = (folder / TRIALS_PARTS_DIR).entries(suffix=".parquet", dirs=False)
    table, covered = trials_with_parts(folder, parts, columns)
    if table is None:
        empty = TRIALS_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    return table


def trials_with_parts(folder: Location, parts: Sequence[Location],
                      columns: list[str] | None = None,
                      base: bool = True) -> tuple[pa.Table | None, frozenset[str]]:
    """(trials.parquet (unless not ``base``) united with ``parts`` that it does not cover, less
    the single parts a batch part among them covers, a trial in several as its newest row;
    the part names trials.parquet covers). None when there is no row to read."""
    path = folder / TRIALS_FILE
    base_table = _read_table(path, columns) if base and path.is_file() else None
    covered = covers(base_table.schema.metadata) if base_table is not None else frozenset()
    tables = [base_table] if base_table is not None else []
    batched: set[str] = set()  # single parts a batch-* part holds (compaction.batch_trials)
    for part in parts:
        if part.name.startswith(COMPACT_PREFIX) and part.name not in covered:
            schema = _read_schema(part)
            batched |= covers(schema.metadata if schema is not None else None)
    # batches first: every single part left beside a batch is newer than its rows
    new = sorted((p for p in parts if p.name not in covered and p.name not in batched),
                 key=lambda p: (not p.name.startswith(COMPACT_PREFIX), p.name))
    for start in range(0, len(new), _SCAN_FILES):
        chunk = new[start:start + _SCAN_FILES]
        try:
            scanned = ds.dataset([p.path for p in chunk], schema=TRIALS_SCHEMA,
                                 format="parquet", filesystem=folder.fs).to_table(columns=columns)
            tables.append(scanned)
        except FileNotFoundError:
            raise
        except _UNREADABLE:  # a corrupt part: read one at a time, to name it
            tables += [t for t in (_read_table(p, columns) for p in chunk) if t is not None]
    if not tables:
        return None, covered
    meta = tables[0].schema.metadata
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 \
        else tables[0]
    return _newest_per_trial(table).replace_schema_metadata(meta), covered


def _newest_per_trial(table: pa.Table) -> pa.Table:
    """One row per trial_id: its last one (rows come oldest first). Unchanged when every
    trial_id is distinct already (the common case, checked without a Python loop)."""
    if "trial_id" not in table.column_names or table.num_rows == 0:
        return table
    if pc.count_distinct(table["trial_id"]).as_py() == table.num_rows:
        return table
    index = pa.table({"trial_id": table["trial_id"],
                      "row": pa.array(range(table.num_rows), pa.int64())})
    last = index.group_by("trial_id", use_threads=False).aggregate([("row", "max")])
    rows = last["row_max"]
    return table.take(pc.take(rows, pc.sort_indices(rows)))


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


def history_files(run_dir: str | os.PathLike[str] | Location) -> list[Location]:
    """The history files that hold rows no other one holds, in name order: every part and
    compact-* file, less the parts a compact-* file covers (a compaction that was killed
    between renaming its file into place and deleting the parts). A compact-* file whose
    footer cannot be read covers nothing (the scan names it)."""
    files = (Location.of(run_dir) / HISTORY_DIR).entries(suffix=".parquet", dirs=False)
    covered: set[str] = set()
    for file in files:
        if file.name.startswith(COMPACT_PREFIX):
            try:
                covered |= covers(file.read_schema().metadata)
            except FileNotFoundError:
                raise
            except _UNREADABLE:
                continue
    return [f for f in files if f.name not in covered]


def corrupt_parts(run_dir: str | os.PathLike[str] | Location) -> list[CorruptFile]:
    """The history files that cannot be read whole (every page of every column read, one file
    at a time), in name order."""
    return _retrying(lambda: _corrupt_parts_once(Location.of(run_dir)))


def _corrupt_parts_once(folder: Location) -> list[CorruptFile]:
    bad = []
    for part in history_files(folder):
        try:
            part.read_table()
        except FileNotFoundError:
            raise
        except _UNREADABLE as err:
            bad.append(_unreadable(part, err, _PART_FIX))
    return bad


def read_history(run_dir: str | os.PathLike[str] | Location, columns: list[str] | None = None,
                 trial_ids: Sequence[str] | None = None) -> pa.Table:
    """All history rows (column projection and a trial filter pushed into the scan).
    CorruptFile naming the first part that cannot be read; inside :func:`skipping_corrupt`,
    the rows of the parts that can. Each row once, also while a compaction runs
    (:func:`history_files`; a file deleted after the listing: listed again)."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    return _retrying(lambda: _read_history_once(
        folder, lambda files: _scan(folder, files, columns, trial_ids)))


def history_trial_ids(run_dir: str | os.PathLike[str] | Location) -> pa.Array:
    """The distinct trial ids in history/ (string, in no set order), streamed: trial_id read
    as the dictionary Parquet stores it, batch by batch, so ten million rows take a pass over
    integer codes and never a column of strings. Corrupt parts as :func:`read_history`."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    return _retrying(lambda: _read_history_once(folder, lambda files: _scan_ids(folder, files)))


def _read_history_once(folder: Location, scan: Callable[[list[str]], _T]) -> _T:
    files = [f.path for f in history_files(folder)]
    try:
        return scan(files)
    except FileNotFoundError:
        raise
    except _UNREADABLE:
        bad = corrupt_parts(folder)
        if not bad:
            raise  # not a corrupt part: a bug, with its traceback
    for err in bad:
        _corrupt(err)
    left_out = {err.location.path for err in bad}
    return scan([f for f in files if f not in left_out])


def _scan(folder: Location, files: list[str], columns: list[str] | None,
          trial_ids: Sequence[str] | None) -> pa.Table:
    if not files:
        empty = HISTORY_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    dataset = ds.dataset(files, schema=HISTORY_SCHEMA, format="parquet", filesystem=folder.fs)
    flt = ds.field("trial_id").isin(list(trial_ids)) if trial_ids is not None else None
    return dataset.to_table(columns=columns, filter=flt)


def _scan_ids(folder: Location, files: list[str]) -> pa.Array:
    if not files:
        return pa.array([], pa.string())
    fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(
        dictionary_columns={"trial_id"}))
    dataset = ds.dataset(files, schema=HISTORY_SCHEMA, format=fmt, filesystem=folder.fs)
    found = []
    for batch in dataset.to_batches(columns=["trial_id"]):
        column = batch.column(0)
        if isinstance(column, pa.DictionaryArray):  # the codes seen, then their strings
            seen = np.zeros(len(column.dictionary), dtype=bool)
            seen[column.indices.to_numpy(zero_copy_only=False)] = True  # never null
            found.append(column.dictionary.filter(pa.array(seen)))
        else:
            found.append(pc.unique(column))
    if not found:
        return pa.array([], pa.string())
    ids: pa.Array = pc.unique(pa.concat_arrays(found))
    return ids


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
    if not trials_file.is_file():  # before the first compaction: a trial part's copy
        parts = (folder / TRIALS_PARTS_DIR).entries(suffix=".parquet", dirs=False)
        if not parts:
            return ""
        trials_file = parts[0]
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
