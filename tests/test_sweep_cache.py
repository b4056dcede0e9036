"""An image folder is encoded once on the driver and every trial of the sweep reads that cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.engine import run_cli, trials_by_id, write_space
from tune_sana.data import cache as encode
from tune_sana.testing.tiny_sana import build_tiny_pipeline, write_images

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]



def test_two_trials_share_one_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNE_SANA_HOME", str(tmp_path / "home"))
    pipe = build_tiny_pipeline(tmp_path / "pipe")
    write_images(tmp_path / "images", 12)
    space_file = write_space(tmp_path, "cached", {
        "trial": "sana_finetune",
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"model": str(pipe), "data": str(tmp_path / "images"), "steps": 4,
                  "batch_size": 2, "eval_every": 2, "device": "cpu"},
        "space": {"lr": {"grid": [1e-4, 1e-3]}},
    })
    before = Counter(encode.LOADS)
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "c") == 0
    assert encode.LOADS - before == Counter({"vae": 1, "text_encoder": 1})

    rows = list(trials_by_id(tmp_path / "c").values())
    assert [r["outcome"] for r in rows] == ["completed", "completed"]
    cache = yaml.safe_load((tmp_path / "c" / "sweep.yaml").read_text())["fixed"]["data"]
    assert Path(cache).is_relative_to(tmp_path / "home") and encode.is_encoded(cache)
    assert {r["data"] for r in rows} == {cache}

    again = Counter(encode.LOADS)  # a second sweep on the same images finds the cache
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "c2") == 0
    assert encode.LOADS == again
