"""A sweep on two Ray nodes on loopback that share no folders (issue 15 item 4).

The head node (no CPUs for trials) runs the driver, `tune-sana sweep --address`, with its run
directory and its encoded data on "the driver's disk"; a worker node started with `ray start
--address`, its own temp dir, HOME, TUNE_SANA_HOME, TMPDIR and working directory, and the custom
resource ``worker_node`` that the space asks for, runs every trial. Token authentication is on,
with the token handed to each node by environment, as on a real cluster.

On one machine the disk is shared, so the test takes it away from the worker nodes twice over:
each runs in its own mount namespace where the driver's folders (its run and data folder, its
TUNE_SANA_HOME, the head's temp dir) are empty tmpfs mounts, where the machine allows it (root
or CAP_SYS_ADMIN: `unshare --mount`); and every Python process of a worker node loads a guard (a
sitecustomize on the node's PYTHONPATH) that refuses and logs any file operation under those
folders (Python's audit events: open, listdir, scandir, mkdir, rename, remove, chdir, ...).
Without the namespace the guard alone cannot see pyarrow's C++ file calls (Ray's checkpoint
copies). With the namespace, a sweep without engine/driverfs.py ends its trials with Ray's
"Unable to set up cluster storage" error, and one without engine/shipping.py with "data '...':
no such folder", as on a real cluster without a shared disk (both tried by hand when this test
was written; not run here, to keep its time).

The sweep runs one configuration twice, one trial at a time. Once the first trial writes its
second checkpoint to the driver's disk (so Ray holds its first), the worker node is killed (its
`ray start --block` process, SIGKILL: the node's raylet and workers die with it, a node lost
rather than drained) and a new worker node with the same resource joins. The sweep must end
with both trials completed, the interrupted one retried from its checkpoint and ending exactly
where its uninterrupted twin ended, each step recorded once.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine import start_sweep, trials_by_id, write_space
from tune_sana.data.encoded import Encoded, load_data, save_encoded
from tune_sana.engine.relay import unpack
from tune_sana.engine.shipping import SHIPPED_DIR
from tune_sana.record.readers import read_history

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
STEPS = 40
GUARD = '''\
"""Refuse and log file operations under $TUNE_SANA_GUARD_FORBID (tests/test_multinode.py)."""
import os
import sys

_FORBID = tuple(os.path.realpath(p) for p in
                os.environ.get("TUNE_SANA_GUARD_FORBID", "").split(os.pathsep) if p)
_LOG = os.environ.get("TUNE_SANA_GUARD_LOG", "")
_PATH_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename",
                "os.replace", "os.rmdir", "os.chdir", "os.truncate", "os.utime", "os.chmod",
                "os.symlink", "os.link", "shutil.copyfile", "shutil.copytree", "shutil.rmtree",
                "shutil.move", "glob.glob"}
_busy = []


def _log(line):
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


def _forbidden(arg):
    if isinstance(arg, int) or arg is None:
        return None
    try:
        path = os.path.realpath(os.fsdecode(arg))
    except (TypeError, ValueError):
        return None
    for root in _FORBID:
        if path == root or path.startswith(root + os.sep):
            return path
    return None


def _hook(event, args):
    if event not in _PATH_EVENTS or _busy:
        return
    _busy.append(1)
    try:
        if event == "os.chdir":
            _log(f"chdir {os.getpid()} {os.path.realpath(os.fsdecode(args[0]))}")
        for arg in args[:2]:
            bad = _forbidden(arg)
            if bad is not None:
                _log(f"denied {os.getpid()} {event} {bad}")
                raise PermissionError(f"test guard: {event} {bad} is on the driver's disk")
    finally:
        _busy.pop()


if _FORBID and _LOG:
    _log(f"armed {os.getpid()} {' '.join(sys.argv[:2])[:200]}")
    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ports(head: bool) -> list[str]:
    """Every port a node opens, chosen free: two nodes on one host (and other Ray instances on
    this machine) must not collide on Ray's fixed defaults."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
             "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port"]
    if head:
        names += ["--ray-client-server-port", "--dashboard-port"]
    return [arg for name in names for arg in (name, str(_free_port()))]


def _hidden(dirs: list[str], command: list[str]) -> list[str]:
    """``command`` run in its own mount namespace in which each of ``dirs`` is covered by an
    empty tmpfs: a process that cannot see the driver's disk at all, whatever the language of
    the code that looks (pyarrow's C++ included)."""
    mounts = "".join(f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(d)}; " for d in dirs)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
            f"{mounts}exec {shlex.join(command)}"]


def _can_hide(folder: Path) -> bool:
    """Whether this machine lets the test hide folders that way (root, or CAP_SYS_ADMIN)."""
    probe = folder / "probe"
    probe.mkdir()
    (probe / "seen").touch()
    if not shutil.which("unshare"):
        return False
    result = subprocess.run(_hidden([str(probe)], ["ls", "-A", str(probe)]),
                            capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and result.stdout.strip() == ""


@dataclass
class Node:
    """One `ray start --block` process (a Ray node) and the folders it owns."""

    name: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def node_id(self) -> str:
        """The node's Ray id, as its raylet logs it when it starts."""
        text = "".join(p.read_text(errors="replace") for p in
                       self.temp_dir.glob("session_*/logs/raylet.out"))
        found = re.search(r"Setting node ID node_id=([0-9a-f]+)", text)
        assert found, f"{self.name}: no node id in its raylet log"
        return found.group(1)

    def ready(self, timeout_s: float = 180) -> bool:
        """Wait until the node runs (True) or its `ray start` gave up (False)."""
        deadline = time.monotonic() + timeout_s
        while "block forever" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"{self.name} did not start in {timeout_s} s"
            time.sleep(0.3)
        return True

    def kill(self) -> None:
        """SIGKILL the node: its raylet and workers die with the `ray start` process (Ray's
        kernel fate sharing); a node lost, not a node drained."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)


@dataclass
class Cluster:
    base: Path
    env: dict[str, str]
    gcs: str
    driver: Path  # the driver's disk: the space, the encoded data, the run directory
    forbid: list[str]  # the driver's folders, as worker nodes must not see them
    hide: bool  # worker nodes see empty folders there (a mount namespace), not only the guard
    nodes: list[Node] = field(default_factory=list)  # every node started (to stop them all)
    workers: list[Node] = field(default_factory=list)  # the worker nodes that came up

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path,
              hidden: list[str] | None = None) -> Node:
        """Start a node; ``hidden``: folders it must see as empty (see _hidden)."""
        root = self.base / name
        (root / "ray").mkdir(parents=True)
        log = root / "ray-start.log"
        command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir",
                   str(root / "ray"), "--disable-usage-stats", "--object-store-memory",
                   str(200 * 2**20), *args]
        if hidden:
            command = _hidden(hidden, command)  # exec'd: the pid is still ray start's
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        node = Node(name, root, process, log)
        self.nodes.append(node)
        return node

    def add_worker(self, name: str, started: Node | None = None) -> Node:
        """A running worker node that shares nothing with the driver: its own HOME,
        TUNE_SANA_HOME, TMPDIR and working directory; the driver's folders hidden (where the
        machine allows) and refused by the guard on its PYTHONPATH; token auth by env var.

        Started again (in a fresh folder) if `ray start` gives up: it allows a raylet 30 s to
        register, which a loaded 2-core machine sometimes misses. ``started``: the first
        attempt, already started."""
        for attempt in range(3):
            node = started or self.start_worker(name if attempt == 0 else f"{name}-{attempt}")
            started = None
            if node.ready():
                self.workers.append(node)
                return node
            node.kill()
        raise AssertionError(f"{name}: ray start failed 3 times\n{node.log.read_text()[-3000:]}")

    def start_worker(self, name: str) -> Node:
        root = self.base / name
        for sub in ("home", "tmp", "cwd"):
            (root / sub).mkdir(parents=True)
        env = {**self.env, "HOME": str(root / "home"), "TUNE_SANA_HOME": str(root / "home"),
               "TMPDIR": str(root / "tmp"),
               "PYTHONPATH": os.pathsep.join([str(self.base / "guard"),
                                              *filter(None, [self.env.get("PYTHONPATH")])]),
               "TUNE_SANA_GUARD_FORBID": os.pathsep.join(self.forbid),
               "TUNE_SANA_GUARD_LOG": str(root / "guard.log")}
        return self.start(name, ["--address", self.gcs, "--num-cpus", "2", "--resources",
                                 json.dumps({"worker_node": 2}), *_ports(False)], env,
                          root / "cwd", hidden=self.forbid if self.hide else None)


def _encoded_data(folder: Path) -> Path:
    """A small encoded dataset (the demo's shapes, 64 train + 32 val rows) on the driver's
    disk, as `tune-sana cache` would leave it."""
    split = load_data("builtin:shapes")
    train, val = split.train.take(torch.arange(64)), split.val.take(torch.arange(32))
    every = Encoded(torch.cat([train.latents, val.latents]), torch.cat([train.text, val.text]),
                    torch.cat([train.mask, val.mask]))
    is_val = torch.cat([torch.zeros(64, dtype=torch.bool), torch.ones(32, dtype=torch.bool)])
    return save_encoded(folder, every, is_val, {"source": "test_multinode"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not shutil.which(RAY):
        pytest.fail(f"{RAY} not found: install the cluster extra (pip install -e .[cluster])")
    # A short folder: Ray's socket paths under a node's temp dir must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="tsm-"))
    driver = base / "driver"
    (base / "guard").mkdir()
    (base / "guard" / "sitecustomize.py").write_text(GUARD)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH",
                                                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
               # A killed node is declared dead after ~3 s instead of Ray's ~15 s.
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    home = Path(os.environ.get("TUNE_SANA_HOME", Path.home() / ".cache" / "tune-sana"))
    for folder in (driver, home):
        folder.mkdir(parents=True, exist_ok=True)
    made = Cluster(base, env, f"127.0.0.1:{port}", driver,
                   forbid=[str(driver), str(base / "head"), str(home)], hide=_can_hide(base))
    try:
        head = made.start("head", ["--head", "--port", str(port), "--num-cpus", "0",
                                   "--include-dashboard", "false", *_ports(True)], env, base)
        worker = made.start_worker("worker1")  # it waits for the head's GCS by itself
        _encoded_data(driver / "data")
        assert head.ready(), head.log.read_text()[-3000:]
        made.add_worker("worker1", started=worker)
        yield made
    finally:
        for node in made.nodes:
            node.kill()
        shutil.rmtree(base, ignore_errors=True)


def _guard_lines(node: Node) -> list[list[str]]:
    log = node.root / "guard.log"
    return [line.split(" ", 3) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_worker_node_cannot_see_or_open_the_drivers_folders(
        cluster: Cluster, tmp_path: Path) -> None:
    """The worker node sees empty folders where the driver's are (in its mount namespace, read
    through /proc/<pid>/root), and the guard its processes load refuses a driver path (else
    the sweep's clean guard log would prove nothing)."""
    worker = cluster.workers[0]
    if cluster.hide:
        assert (cluster.driver / "data" / "meta.json").is_file()
        assert os.listdir(f"/proc/{worker.process.pid}/root{cluster.driver}") == []
    log = tmp_path / "guard.log"
    env = {**cluster.env, "PYTHONPATH": str(cluster.base / "guard"),
           "TUNE_SANA_GUARD_FORBID": str(cluster.driver), "TUNE_SANA_GUARD_LOG": str(log)}
    target = cluster.driver / "data" / "meta.json"
    code = f"try:\n    open({str(target)!r})\nexcept PermissionError:\n    print('refused')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.stdout.strip() == "refused", result.stderr
    assert any(line.startswith("denied ") and str(target) in line
               for line in log.read_text().splitlines())


def _space(cluster: Cluster) -> Path:
    return write_space(cluster.driver, "multinode", {
        "trial": "sana_finetune", "max_retries": 2,
        # Two runs of one configuration, one at a time: the first is cut by the node's death
        # and retried from its checkpoint, the second (its twin) runs uninterrupted.
        "search": {"algorithm": "grid", "num_samples": 2, "max_concurrent": 1},
        "scheduler": {"type": "fifo"},
        "resources": {"cpu": 1, "custom": {"worker_node": 1}},
        "fixed": {"model": "sana-tiny", "data": str(cluster.driver / "data"), "steps": STEPS,
                  "batch_size": 8, "val_batch_size": 16, "eval_every": 10,
                  "checkpoint_every": 10, "device": "cpu", "threads": 1, "precision": "fp32"},
        "space": {"lr": {"grid": [1.0e-3]}},
    })


def _running_checkpoint(run_dir: Path) -> bool:
    """A trial not yet recorded as finished is making its second checkpoint on the driver's
    disk, so Ray has registered its first: a retry has one to resume from."""
    finished = set(trials_by_id(run_dir)) if (run_dir / "trials.parquet").exists() else set()
    return any(not any(t in ckpt.parent.name for t in finished)
               for ckpt in run_dir.glob("*/checkpoint_*") if not ckpt.name.endswith("00"))


def _results(run_dir: Path) -> list[dict[str, Any]]:
    """Every result Ray received, from its result.json lines (which the driver keeps in the
    run directory), each with the trial's folder name."""
    return [{**json.loads(line), "folder": results.parent.name}
            for results in run_dir.glob("*/result.json")
            for line in results.read_text().splitlines()]


def test_trials_run_on_a_worker_node_that_dies_and_the_sweep_loses_and_doubles_nothing(
        cluster: Cluster) -> None:
    started = time.monotonic()
    runs = cluster.driver / "runs"
    driver = start_sweep(_space(cluster), runs, "--address", cluster.gcs, "--progress-every", "5",
                         env=cluster.env)
    run_dir = runs / "k"
    try:
        deadline = time.monotonic() + 240
        while not (run_dir.is_dir() and _running_checkpoint(run_dir)):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:] \
                if driver.stderr else ""
            assert time.monotonic() < deadline, "no trial checkpointed in time"
            time.sleep(0.2)
        first = cluster.workers[0]
        first_id = first.node_id()
        first.kill()  # the node is lost mid-trial
        second = cluster.add_worker("worker2")  # retries need a node with worker_node
        _, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:  # a failed wait: the driver and its Ray processes go too
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, err.decode()[-3000:]
    second_id = second.node_id()

    rows = trials_by_id(run_dir)
    assert len(rows) == 2 and all(r["outcome"] == "completed" for r in rows.values()), rows
    # Both trials ended on the new worker node (the node column: a trial's last attempt); the
    # first attempt of the retried one ran on the lost node (its pids, checked below).
    assert first_id != second_id
    assert {r["node"] for r in rows.values()} == {second_id}

    # Nothing lost, nothing doubled: each trial's steps 0..STEPS, each once, in the history.
    history = read_history(run_dir, ["trial_id", "step"]).to_pylist()
    per_step = Counter((h["trial_id"], h["step"]) for h in history)
    assert set(per_step.values()) == {1}
    assert sorted(per_step) == sorted((t, s) for t in rows for s in range(STEPS + 1))

    # The checkpoints survived the node: the retried trial's second attempt began after a
    # checkpoint (step 11 or 21, not 0) and it ended exactly where its twin (same
    # configuration, never interrupted) ended.
    (retried,) = [t for t, r in rows.items() if r["retries"]]
    (twin,) = [t for t, r in rows.items() if not r["retries"]]
    attempts: dict[int, list[int]] = {}
    for result in _results(run_dir):
        if retried in result["folder"]:
            attempts.setdefault(result["pid"], []).extend(
                r["step"] for r in unpack(result) if "step" in r)
    assert len(attempts) == 2, attempts  # one process on each worker node
    before, after = sorted(attempts.values(), key=min)
    assert min(before) == 0 and min(after) in (11, 21), attempts
    assert (rows[retried]["config_id"], rows[retried]["best_val_loss"],
            rows[retried]["final_val_loss"]) == (rows[twin]["config_id"],
                                                 rows[twin]["best_val_loss"],
                                                 rows[twin]["final_val_loss"])
    assert all(list(run_dir.glob(f"*{t}*/checkpoint_*")) for t in rows)  # on the driver's disk

    # The encoded data reached both worker nodes through the object store, copied into each
    # node's own TUNE_SANA_HOME; the trials never touched a driver path.
    trial_pids = _trial_pids(run_dir)
    armed: set[str] = set()
    for node in (first, second):
        shipped = list((node.root / "home" / SHIPPED_DIR).glob("*/encoded.safetensors"))
        assert len(shipped) == 1, node.name
        lines = _guard_lines(node)
        assert not [line for line in lines if line[0] == "denied"], lines
        here = {line[1] for line in lines if line[0] == "armed"} & trial_pids
        assert here, f"no trial process ran on {node.name}"
        armed |= here
        # The node's trials worked in its own folders (Ray's trial dirs under its temp dir).
        chdirs = [line[2] for line in lines if line[0] == "chdir" and line[1] in here]
        assert chdirs and all(Path(c).is_relative_to(node.root) for c in chdirs), chdirs
    assert armed == trial_pids  # every trial process ran on a worker node, the guard armed
    hidden = "hidden from" if cluster.hide else "refused (not hidden: no unshare) to"
    print(f"two-node sweep with a node lost: {time.monotonic() - started:.0f} s; the driver's "
          f"folders {hidden} the worker nodes")


def _trial_pids(run_dir: Path) -> set[str]:
    """Pids of the processes that ran the trials."""
    return {str(result["pid"]) for result in _results(run_dir)}
