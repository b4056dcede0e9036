"""The same sweep command on a real Ray cluster: a head node on 127.0.0.1, joined with --address
and through `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import trials_by_id, write_space
from tune_sana.cli import main

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# Token auth on, as Ray 2.60 recommends: the head, the job CLI and the driver all use it.
CLUSTER_ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
               "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(gcs address, dashboard address) of a fresh head node, stopped afterwards.

    A `ray start --block` process in a session of its own, stopped by signalling that process
    group: `ray stop` would stop every Ray node on the machine, other tests' and other users'
    too. Its agents get free ports, not Ray's fixed defaults (52365 and others), which another
    Ray on the machine may hold."""
    if not shutil.which(RAY):
        pytest.fail(f"{RAY} not found: install the cluster extra (pip install -e .[cluster])")
    port, dash = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
             str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()),
             "--metrics-export-port", str(_free_port())],
            env=CLUSTER_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the head node did not start in 180 s"
            time.sleep(0.3)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group (its GCS, raylet, agents, workers), then SIGKILL what is
    left after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.wait(timeout=10)
                return
            process.poll()
            time.sleep(0.2)


def _space(tmp_path: Path) -> Path:
    return write_space(tmp_path, "cluster", {
        "trial": "synthetic",
        "search": {"algorithm": "optuna", "num_samples": 4, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 10, "diverge_above": 1e-2},
        "space": {"lr": {"loguniform": [1e-4, 1.0]}},
    })


def test_sweep_joins_a_cluster_with_address(head: tuple[str, str], tmp_path: Path) -> None:
    gcs, _ = head
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(_space(tmp_path)), "--address", gcs,
         "--storage", str(tmp_path), "--name", "a"],
        capture_output=True, text=True, timeout=300, env=CLUSTER_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(trials_by_id(tmp_path / "a")) == 4


def test_sweep_submitted_as_a_ray_job(head: tuple[str, str], tmp_path: Path) -> None:
    _, dashboard = head
    command = [RAY, "job", "submit", "--address", dashboard, "--",
               sys.executable, "-m", "tune_sana.cli", "sweep", str(_space(tmp_path)),
               "--storage", str(tmp_path), "--name", "j"]
    deadline = time.monotonic() + 300  # 120 s was not enough on a 2-core box under load
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=CLUSTER_ENV)
        # Right after `ray start` the head's job agent may not be registered yet (seen on a
        # loaded 2-core machine): Ray answers "No available agent" and submits nothing.
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "succeeded" in result.stdout.lower()
    assert len(trials_by_id(tmp_path / "j")) == 4


def _drivers(dashboard: str) -> int:
    listed = subprocess.run([RAY, "list", "jobs", "--address", dashboard, "--format", "json",
                             "--limit", "1000"], capture_output=True, text=True, timeout=120,
                            env=CLUSTER_ENV, check=True)
    text = listed.stdout.strip()
    return 0 if text == "No resource in the cluster" else len(json.loads(text))


def test_sweep_without_address_starts_its_own_ray_beside_a_running_cluster(
        head: tuple[str, str], tmp_path: Path) -> None:
    """`ray.init()` with no address joins a cluster already running on the machine; the
    embedded sweep must start its own (address "local") and leave the cluster alone."""
    _, dashboard = head
    before = _drivers(dashboard)
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(_space(tmp_path)),
         "--storage", str(tmp_path), "--name", "own"],
        capture_output=True, text=True, timeout=300, env=CLUSTER_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(trials_by_id(tmp_path / "own")) == 4
    assert _drivers(dashboard) == before  # no driver ever connected to the cluster


def test_unreachable_address_is_one_line_in_bounded_time(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", str(_space(tmp_path)), "--address", f"127.0.0.1:{_free_port()}",
                 "--storage", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("tune-sana: error: --address 127.0.0.1:") and "\n" not in err
    assert not any(tmp_path.glob("cluster-*")), "nothing written for a failed start"
