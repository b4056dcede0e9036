"""What tune-sana exposes: local Ray on loopback only and no dashboard; weights read as
safetensors; YAML read with the safe loader; no unsafe unpickling of user paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, psutil, time
from tune_sana.engine.sweep import SweepOptions, init_ray
init_ray(SweepOptions(num_cpus=1))
import ray
@ray.remote
def ping():
    return 1
assert ray.get(ping.remote()) == 1  # workers up too
time.sleep(2)
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
listening = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in pids:
        listening.append([c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()])
names = [" ".join(psutil.Process(p).cmdline()) for p in pids if psutil.pid_exists(p)]
print(json.dumps({"listening": listening, "cmdlines": names}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_without_dashboard() -> None:
    import json

    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["listening"], "expected Ray's servers to listen somewhere"
    for ip, port, name in report["listening"]:
        assert ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (ip, port, name)
    # Ray keeps a head process for usage stats; the dashboard's web UI must not be served.
    heads = [c for c in report["cmdlines"] if "dashboard/dashboard.py" in c]
    assert all("--disable-frontend" in c for c in heads), "dashboard UI started"
    assert all(port != 8265 for _, port, _ in report["listening"]), "dashboard port open"


def _sources() -> list[Path]:
    return sorted([*(ROOT / "tune_sana").rglob("*.py"), *(ROOT / "trials").rglob("*.py")])


def test_no_unsafe_loaders_in_the_code() -> None:
    offenders = []
    for path in _sources():
        text = path.read_text()
        for pattern in (r"yaml\.load\(", r"yaml\.unsafe_load", r"pickle\.loads?\(",
                        r"use_safetensors=False"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_checkpoints_load_through_safetensors_only(tmp_path: Path) -> None:
    """A folder with only a pickled .bin checkpoint is refused, never unpickled."""
    import torch

    from tune_sana.config import UserError
    from tune_sana.training.models import load_transformer

    (tmp_path / "config.json").write_text('{"_class_name": "SanaTransformer2DModel"}')
    torch.save({"x": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="no diffusion_pytorch_model.safetensors"):
        load_transformer(str(tmp_path), variant=None, dtype=torch.float32)
