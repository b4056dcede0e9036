"""One writer per run directory (engine/runlock.py): a lock held by a live process elsewhere is
refused naming it; a dead holder's lock (a killed process on this host, a stale heartbeat from
another host, a reused pid, a torn file) is taken over; of several contenders exactly one wins.
Each on a local folder and on a file:// URI (the URI code path: write, settle, read back). A live
sweep holding its run is refused by a second ``tune-sana sweep`` in tests/test_interrupt.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tune_sana.config import UserError
from tune_sana.engine.runlock import STALE_S, Holder, RunLock, hold, lock_file, read_holder
from tune_sana.record.storage import Location

FAST = {"settle_s": 0.05}


def _run(tmp_path: Path, kind: str) -> str:
    """The run directory ``r`` under ``tmp_path/runs``: a path or a file:// URI."""
    (tmp_path / "runs").mkdir(exist_ok=True)
    folder = tmp_path / "runs" / "r"
    return str(folder) if kind == "local" else folder.as_uri()


def _write_record(run: str, **fields: object) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "heartbeat": time.time(), "token": "someone-else", "proc_start": None, **fields}
    Path(lock_file(run).path).write_text(json.dumps(record))


def _holder_process(run: str) -> subprocess.Popen[str]:
    """A second process that takes the lock, says so, and sleeps."""
    code = ("import sys, time\nfrom tune_sana.engine.runlock import hold\n"
            f"with hold({run!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


KINDS = pytest.mark.parametrize("kind", ["local", "uri"])


@KINDS
def test_the_lock_is_one_hidden_file_beside_the_run_gone_after(tmp_path: Path,
                                                               kind: str) -> None:
    run = _run(tmp_path, kind)
    with hold(run, **FAST) as lock:
        assert [p.name for p in (tmp_path / "runs").iterdir()] == [".r.lock"]
        holder = read_holder(run)
        assert holder == lock.holder and holder.pid == os.getpid()
        assert holder.host == socket.gethostname()
    assert list((tmp_path / "runs").iterdir()) == []  # nothing left, not even a run folder


@KINDS
def test_released_when_the_block_raises(tmp_path: Path, kind: str) -> None:
    run = _run(tmp_path, kind)
    with pytest.raises(RuntimeError), hold(run, **FAST):
        raise RuntimeError("the sweep failed")
    assert read_holder(run) is None
    with hold(run, **FAST):  # free again
        pass


@KINDS
def test_a_live_holder_is_refused_by_name_and_its_lock_taken_over_once_it_dies(
        tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, kind)
    other = _holder_process(run)
    try:
        theirs = read_holder(run)
        assert theirs is not None and theirs.pid == other.pid
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(theirs.started))
        with pytest.raises(UserError) as refused:
            hold(run, **FAST).__enter__()
        assert str(refused.value) == (
            f"{run} is in use by another sweep (host {socket.gethostname()}, pid {other.pid}, "
            f"started {started}); wait for it to end or stop it, or choose another --name")
        assert read_holder(run) == theirs  # the refused attempt changed nothing
    finally:
        other.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
        other.wait()
    assert read_holder(run) == theirs
    with hold(run, **FAST) as lock:
        assert read_holder(run) == lock.holder
    assert f"took over the lock of {run} from a sweep that is no longer running" in \
        capsys.readouterr().err
    assert read_holder(run) is None


@KINDS
def test_another_hosts_lock_lives_as_long_as_its_heartbeat(tmp_path: Path, kind: str) -> None:
    """Pids on another host say nothing here: only its heartbeat does."""
    run = _run(tmp_path, kind)
    _write_record(run, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(UserError, match="in use by another sweep \\(host elsewhere, pid 1,"):
        hold(run, **FAST).__enter__()
    _write_record(run, host="elsewhere", pid=1, heartbeat=time.time() - STALE_S - 5)
    with hold(run, **FAST) as lock:
        assert read_holder(run) == lock.holder


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """Same host, the pid runs, but it is another process (it started at another time)."""
    run = _run(tmp_path, "local")
    parent = os.getppid()
    real_start = Path(f"/proc/{parent}/stat").read_text().rpartition(")")[2].split()[19]
    _write_record(run, pid=parent, proc_start=real_start)
    with pytest.raises(UserError, match=f"pid {parent},"):
        hold(run, **FAST).__enter__()
    _write_record(run, pid=parent, proc_start=str(int(real_start) + 1))
    with hold(run, **FAST) as lock:
        assert read_holder(run) == lock.holder


@KINDS
def test_an_unreadable_lock_file_is_refused_while_new_and_taken_over_when_old(
        tmp_path: Path, kind: str) -> None:
    run = _run(tmp_path, kind)
    torn = Path(lock_file(run).path)
    torn.write_text('{"host": "x", "pi')
    with pytest.raises(UserError, match="lock file .* is unreadable and new"):
        hold(run, **FAST).__enter__()
    old = time.time() - STALE_S - 5
    os.utime(torn, (old, old))
    with hold(run, **FAST) as lock:
        assert read_holder(run) == lock.holder


@KINDS
def test_the_heartbeat_advances_and_a_lost_lock_is_left_to_its_new_holder(
        tmp_path: Path, kind: str) -> None:
    run = _run(tmp_path, kind)
    with hold(run, heartbeat_s=0.05, **FAST) as lock:
        first = read_holder(run)
        assert first is not None
        deadline = time.monotonic() + 10
        while (read_holder(run) or first).heartbeat == first.heartbeat:
            assert time.monotonic() < deadline, "the heartbeat never advanced"
            time.sleep(0.05)
        _write_record(run, token="a-new-holder")
        while not lock.lost:
            assert time.monotonic() < deadline, "the lost lock was not noticed"
            time.sleep(0.05)
    after = read_holder(run)
    assert after is not None and after.token == "a-new-holder"  # not deleted at release


@KINDS
@pytest.mark.parametrize("dead_holder", [False, True], ids=["free", "dead-holder"])
def test_of_several_contenders_exactly_one_wins(tmp_path: Path, kind: str,
                                                dead_holder: bool) -> None:
    """Contenders start together (threads of this process, each its own token); with a dead
    holder's lock there, each of them first finds it dead and removes it."""
    run = _run(tmp_path, kind)
    if dead_holder:
        _write_record(run, host="elsewhere", heartbeat=0.0)
    contenders = 4
    barrier = threading.Barrier(contenders)
    won: list[RunLock] = []
    refused: list[str] = []

    def contend() -> None:
        lock = RunLock(run, settle_s=0.2)
        barrier.wait()
        try:
            lock.acquire()
        except UserError as err:
            refused.append(str(err))
            return
        won.append(lock)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(won) == 1, (len(won), refused)
        assert len(refused) == contenders - 1
        assert all(f"pid {os.getpid()}," in line for line in refused), refused
        assert read_holder(run) == won[0].holder
        leftovers = [p.name for p in (tmp_path / "runs").iterdir()]
        assert leftovers == [".r.lock"], leftovers  # no file set aside left behind
    finally:
        for lock in won:
            lock.release()


def test_a_holder_record_says_who_and_since_when() -> None:
    holder = Holder(host="h", pid=7, started=0.0, heartbeat=0.0, token="t")
    assert holder.describe().startswith("host h, pid 7, started 19")
    assert not holder.is_alive(now=STALE_S + 1)
    assert holder.is_alive(now=STALE_S - 1)
    assert Location.of(lock_file("/a/runs/r")).path == "/a/runs/.r.lock"
