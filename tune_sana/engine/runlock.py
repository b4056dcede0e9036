"""One writer per run directory: a lock file beside the run, held while a sweep writes it.

The lock of ``<storage>/<name>`` is ``<storage>/.<name>.lock`` (a dot-name: listings and
readers never see it), a small JSON record of its holder: host, pid, start time, a random
token and a heartbeat time that the holder rewrites every ``HEARTBEAT_S``.

Taking it:
- a local folder: the file is created with ``O_CREAT | O_EXCL``, so of two sweeps exactly one
  creates it;
- a URI: an object store has no exclusive create, so the record is written, left to settle for
  ``SETTLE_S`` and read back: whoever's token is there holds the lock (the last writer wins,
  and each contender sees the same winner).

A lock is live while its holder is: on the holder's own host, while that pid runs and is the
same process (its start time in /proc matches, so a reused pid does not count); from another
host, where pids say nothing, while its heartbeat is younger than ``STALE_S``. A live holder
makes the second sweep a one-line error naming it; a dead one's lock is taken over. Locally the
contenders take turns (a flock on the folder, which the kernel drops if a contender dies) to
delete the dead record, then create their own as above; on a URI each writes over the dead
record (if it is still there) and reads back as above. Released (deleted, if it is still this
holder's) when the sweep ends, also on error.

On a URI this is as safe as the store's writes are consistent and as the settle time is long
against a contender's delay between reading a record and writing its own: without a conditional
write, two sweeps started within that gap could both believe they hold it. Each holder's
heartbeat reads the record back and warns if it is no longer its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tune_sana.config import UserError
from tune_sana.record.storage import Location

HEARTBEAT_S = 15.0  # how often the holder rewrites its heartbeat
STALE_S = 120.0  # a lock from another host whose heartbeat is older than this is abandoned
SETTLE_S = 0.5  # a URI lock is read back this long after it is written
_READ_TRIES = 10  # a lock file caught between create and write reads as empty: try again


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: what the lock file says."""

    host: str
    pid: int
    started: float  # when the holder took the lock (seconds since the epoch)
    heartbeat: float  # the holder's last sign of life (its own clock)
    token: str  # unique per taking: tells this holder from an earlier one with the same pid
    proc_start: str | None = None  # the process's start in /proc (Linux), against pid reuse

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}"

    def is_alive(self, now: float | None = None, stale_s: float = STALE_S) -> bool:
        """On this host: the process still runs (and is the same one). Elsewhere: its heartbeat
        is younger than ``stale_s``."""
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return False
            return self.proc_start is None or _proc_start(self.pid) in (None, self.proc_start)
        return (time.time() if now is None else now) - self.heartbeat < stale_s


def lock_file(run_dir: str | os.PathLike[str] | Location) -> Location:
    """Where the lock of ``run_dir`` lives: ``.<name>.lock`` in the same folder."""
    run = Location.of(run_dir)
    return run.parent / f".{run.name}.lock"


def read_holder(run_dir: str | os.PathLike[str] | Location) -> Holder | None:
    """The holder named by ``run_dir``'s lock file; None when there is none."""
    return _read(lock_file(run_dir))


class RunLock:
    """The lock on one run directory, held by this process (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike[str] | Location, *,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = SETTLE_S) -> None:
        self.run_dir = Location.of(run_dir)
        self.file = lock_file(self.run_dir)
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.holder = Holder(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                             heartbeat=time.time(), token=uuid.uuid4().hex,
                             proc_start=_proc_start(os.getpid()))
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- taking and giving back ------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the live holder."""
        cleared: Holder | None = None  # the dead holder whose lock this one removed
        for _ in range(5):  # each round: take it, or find its holder (live: refuse; dead: clear)
            if self._create():
                break
            other = _read(self.file)
            if other is None:
                if self.file.exists() and not self._abandoned_unreadable():
                    raise UserError(f"{self.run_dir}: its lock file {self.file} is unreadable and "
                                    "new; if no sweep writes this run, delete the file and run "
                                    "again")
                self._clear(None)
            elif other.is_alive(stale_s=self.stale_s):
                raise UserError(f"{self.run_dir} is in use by another sweep ({other.describe()}); "
                                "wait for it to end or stop it, or choose another --name")
            elif not self.file.is_local:
                if self._create(over=other):
                    cleared = other
                    break
            elif self._clear(other):
                cleared = other
        else:
            raise UserError(f"{self.run_dir}: other sweeps keep taking its lock; run again once "
                            "they are done")
        if cleared is not None:
            _say(f"took over the lock of {self.run_dir} from a sweep that is no longer running "
                 f"({cleared.describe()})")
        self._start_heartbeat()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file, if it is still this holder's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        current = _read(self.file)
        if current is not None and current.token == self.holder.token:
            self.file.delete()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- helpers -------------------------------------------------------------------------------

    def _record(self) -> str:
        return json.dumps(asdict(self.holder), sort_keys=True)

    def _create(self, over: Holder | None = None) -> bool:
        """Create the lock file with this holder's record; False if it exists (or, on a URI,
        if another contender's record is there once it settles). ``over``: on a URI, write
        over this dead holder's record, if it is still the one there."""
        if self.file.is_local:
            Path(self.file.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.file.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as out:
                out.write(self._record())
                out.flush()
                os.fsync(out.fileno())
            return True
        if over is None and self.file.exists():
            return False
        if over is not None and getattr(_read(self.file), "token", None) != over.token:
            return False  # another contender got there first
        self.file.write_text_atomic(self._record())
        time.sleep(self.settle_s)  # a contender writing at the same time: the last write wins
        settled = _read(self.file)
        return settled is not None and settled.token == self.holder.token

    def _abandoned_unreadable(self) -> bool:
        """An unreadable lock file (torn by a crash, or garbage) counts as abandoned once it is
        older than a stale heartbeat."""
        mtime = self.file.mtime()
        return mtime is not None and time.time() - mtime > self.stale_s

    def _clear(self, seen: Holder | None) -> bool:
        """Delete the lock file if it is still the one judged dead (``seen``; None: an
        unreadable one); True if this call deleted it. Locally, contenders do this one at a time
        (_one_at_a_time), and no new lock can be created while the dead one is there, so only
        the dead one is ever deleted. On a URI there are no turns: a dead holder's record is
        written over instead (_create), and only an unreadable one is deleted here."""
        guard = (_one_at_a_time(Path(self.file.path).parent) if self.file.is_local
                 else contextlib.nullcontext())
        with guard:
            current = _read(self.file)
            if seen is None:
                same = current is None
            else:
                same = current is not None and current.token == seen.token
            if same:
                self.file.delete()
            return same

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="tune-sana-runlock",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = _read(self.file)
            if current is None or current.token != self.holder.token:
                if not self.lost:
                    self.lost = True
                    found = current.describe() if current else "no lock file"
                    _say(f"warning: lost the lock on {self.run_dir} ({found}); another sweep "
                         "may be writing this run")
                continue
            self.holder = replace(self.holder, heartbeat=time.time())
            try:
                self.file.write_text_atomic(self._record())
            except OSError as err:  # storage briefly unavailable: the next beat tries again
                _say(f"warning: could not refresh the lock {self.file} ({err})")


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike[str] | Location, **options: float) -> Iterator[RunLock]:
    """Hold the lock on ``run_dir`` for the block (released also when it raises)."""
    lock = RunLock(run_dir, **options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def _one_at_a_time(folder: Path) -> Iterator[None]:
    """Contenders for one lock on this host take turns: an exclusive flock on the folder that
    holds it (released by the kernel if a contender dies). Where the filesystem has no flock
    for folders (NFS), or off POSIX, no turns are taken."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _read(file: Location) -> Holder | None:
    """The holder a lock file names; None if there is no file, or it stays unreadable (a file
    caught between its exclusive create and its write reads as empty for a moment)."""
    for attempt in range(_READ_TRIES):
        try:
            raw = json.loads(file.read_text())
            return Holder(host=str(raw["host"]), pid=int(raw["pid"]),
                          started=float(raw["started"]), heartbeat=float(raw["heartbeat"]),
                          token=str(raw["token"]), proc_start=raw.get("proc_start"))
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError:
            if not file.exists():
                return None
        except (ValueError, KeyError, TypeError):
            pass
        if attempt < _READ_TRIES - 1:
            time.sleep(0.05)
    return None


def _pid_alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 on), where there is one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _proc_start(pid: int) -> str | None:
    """When the process started, in clock ticks after boot (stat field 22); None off Linux."""
    stat = _proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def _say(line: str) -> None:
    print(f"tune-sana: {line}", file=sys.stderr, flush=True)
