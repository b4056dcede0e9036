"""The bad-input corpus: every case is one line naming what is wrong and the fix, exit status 2,
no traceback, and no file written.

CASES: space files, checkpoints, data, storage, cluster addresses, values near their limits;
DATASET_CASES: image folders; TRIAL_VALUES: every key of a trial config; SPACE_VALUES: every key
of a space file; CLI_CASES: every flag of every command. Each key and flag list is checked
against the code, so a new key or flag without a case fails here."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tune_sana.cli import build_parser, main
from tune_sana.config import TRIAL_KEYS
from tune_sana.data.encoded import save_encoded, shapes_images
from tune_sana.engine.space import Dimension, SweepSpec, parse_spec

GOOD = """\
trial: sana_finetune
search: {algorithm: random, num_samples: 2}
scheduler: {type: fifo}
fixed: {steps: 5, model: sana-tiny, device: cpu}
space:
  lr: {loguniform: [1.0e-5, 1.0e-2]}
"""


def _space(tmp: Path, text: str) -> str:
    path = tmp / "space.yaml"
    path.write_text(text)
    return str(path)


def _replace(old: str, new: str) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        assert old in GOOD
        return ["sweep", _space(tmp, GOOD.replace(old, new))]
    return args


_LR = "  lr: {loguniform: [1.0e-5, 1.0e-2]}\n"


def _searched(line: str) -> Callable[[Path], list[str]]:
    """GOOD searching ``line`` instead of lr (and ``steps`` no longer fixed)."""
    def args(tmp: Path) -> list[str]:
        text = GOOD.replace("steps: 5, ", "").replace(_LR, f"  {line}\n")
        return ["sweep", _space(tmp, text)]
    return args


def _fixed(extra: str) -> Callable[[Path], list[str]]:
    return _replace("device: cpu}", f"device: cpu, {extra}}}")


def _fixed_resources(extra: str, resources: str) -> Callable[[Path], list[str]]:
    """GOOD with ``extra`` fixed and ``resources`` set."""
    def args(tmp: Path) -> list[str]:
        text = GOOD.replace("device: cpu}", f"device: cpu, {extra}}}").replace(
            "scheduler:", f"resources: {resources}\nscheduler:")
        return ["sweep", _space(tmp, text)]
    return args


def _checkpoint(tmp: Path, config: str | None = "{}", weights: bool = True) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights:
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def _model(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        return ["sweep", _space(tmp, GOOD.replace("model: sana-tiny", f"model: {make(tmp)}"))]
    return args


def _data(make: Callable[[Path], Path | str]) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        text = GOOD.replace("device: cpu}", f"device: cpu, data: '{make(tmp)}'}}")
        return ["sweep", _space(tmp, text)]
    return args


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _blocker(tmp: Path) -> Path:
    """A path under a regular file: no folder can be made there (also as root)."""
    (tmp / "a-file").write_text("")
    return tmp / "a-file" / "out"


def _pickled_checkpoint(tmp: Path) -> Path:
    folder = _checkpoint(tmp, weights=False)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    return folder


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _address(address: Callable[[int], str]) -> Callable[[Path], list[str]]:
    return lambda t: ["sweep", _space(t, GOOD), "--storage", str(t / "runs"), "--address",
                      address(_closed_port())]


def _corrupt_cache(tmp: Path) -> Path:
    folder = tmp / "cache"
    folder.mkdir()
    (folder / "encoded.safetensors").write_bytes(b"not safetensors at all")
    (folder / "meta.json").write_text("{}")
    return folder


def _run_dir_of_other_space(tmp: Path) -> list[str]:
    """A run dir holding a different spec: --resume must refuse it."""
    run = tmp / "runs" / "old"
    run.mkdir(parents=True)
    (run / "sweep.yaml").write_text("trial: sana_finetune\nfixed: {steps: 99}\n")
    return ["sweep", _space(tmp, GOOD), "--storage", str(tmp / "runs"), "--name", "old",
            "--resume"]


def _named(name: str, uri: bool = False) -> Callable[[Path], list[str]]:
    """GOOD run under --storage <tmp>/runs (a path or a file:// URI) with --name ``name``."""
    def args(tmp: Path) -> list[str]:
        storage = (tmp / "runs").as_uri() if uri else str(tmp / "runs")
        return ["sweep", _space(tmp, GOOD), "--storage", storage, "--name", name]
    return args


def _not_writable_storage(tmp: Path) -> list[str]:
    blocker = tmp / "a-file"
    blocker.write_text("")
    return ["sweep", _space(tmp, GOOD), "--storage", str(blocker / "runs")]


def _encoded_without_val(tmp: Path) -> Path:
    import torch

    images, _ = shapes_images(4)
    from tune_sana.data.encoded import Encoded, demo_encode_images, demo_encode_text
    text, mask = demo_encode_text(["a red square at the center"] * 4)
    return save_encoded(tmp / "enc", Encoded(demo_encode_images(images), text, mask),
                        torch.zeros(4, dtype=torch.bool), {})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Sana pipeline folder with encoders, so image folders get as far as being scanned."""
    from tune_sana.testing.tiny_sana import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe")


def _picture(folder: Path, name: str, size: tuple[int, int] = (64, 64),
             caption: bytes | None = b"a black square") -> None:
    from PIL import Image

    Image.new("RGB", size).save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_bytes(caption)


def _broken_image(folder: Path) -> None:
    _picture(folder, "a")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image has")
    (folder / "b.txt").write_text("a broken square")


def _mixed_sizes(folder: Path) -> None:
    _picture(folder, "a", (64, 64))
    _picture(folder, "b", (48, 80))


# An images folder as a sweep's data (a tiny pipeline as the model): what it holds, the needle;
# EXACT_SIZE ones are encoded by tune-sana cache --size-policy exact instead (a space has no
# size policy: a sweep crops).
DATASET_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "dataset folder with no images": (lambda f: None, "no usable samples"),
    "images without captions": (lambda f: _picture(f, "a", caption=None),
                                "missing caption x1: a.png"),
    "a broken image": (_broken_image, "unreadable image x1: b.png"),
    "mixed image sizes under size_policy exact": (_mixed_sizes, "wrong size x1: b.png"),
    "an image too small to crop": (lambda f: [_picture(f, "a"), _picture(f, "b", (8, 8))],
                                   "too small x1: b.png (too small: 8x8"),
    "a caption that is not text": (lambda f: _picture(f, "a", caption=b"\xff\xfe\x00bad"),
                                   "unreadable caption x1: a.png"),
    "an empty caption": (lambda f: _picture(f, "a", caption=b"  \n"), "empty caption x1"),
}
EXACT_SIZE = {"mixed image sizes under size_policy exact"}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_is_one_line_exit_2(case: str, pipeline: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fill, needle = DATASET_CASES[case]
    images = tmp_path / "images"
    images.mkdir()
    fill(images)
    if case in EXACT_SIZE:
        args = ["cache", str(images), "--model", str(pipeline), "--size-policy", "exact",
                "--resolution", "64", "--cache-root", str(tmp_path / "cache")]
    else:
        text = GOOD.replace("model: sana-tiny", f"model: {pipeline}").replace(
            "device: cpu}", f"device: cpu, data: '{images}'}}")
        args = ["sweep", _space(tmp_path, text), "--storage", str(tmp_path / "runs")]
    monkeypatch.chdir(tmp_path)
    _refused(args, needle, tmp_path, capsys)


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "negative report interval": (lambda t: [*_replace("", "")(t), "--report-every", "-1"],
                                 "--report-every -1"),
    "malformed yaml": (lambda t: ["sweep", _space(t, "space: {lr: [1, 2\n")],
                       "malformed YAML at line"),
    "yaml not a mapping": (lambda t: ["sweep", _space(t, "- lr\n- steps\n")], "expected a mapping"),
    "unknown top-level key": (_replace("search:", "serach:"), "did you mean 'search'"),
    "unknown fixed key": (_fixed("lrr: 0.1"), "did you mean 'lr'"),
    "unknown search key": (_replace("num_samples", "num_sample"), "did you mean 'num_samples'"),
    "unknown distribution": (_replace("loguniform", "logunifrom"), "did you mean 'loguniform'"),
    "wrong type steps": (_replace("steps: 5", "steps: many"), "key 'steps'"),
    "wrong type lr": (_fixed("batch_size: big"), "key 'batch_size'"),
    "inverted range": (_replace("[1.0e-5, 1.0e-2]", "[1.0e-2, 1.0e-5]"), "inverted"),
    "empty range": (_replace("[1.0e-5, 1.0e-2]", "[1.0e-2, 1.0e-2]"), "empty or inverted"),
    "log scale non-positive": (_replace("[1.0e-5, 1.0e-2]", "[0.0, 1.0e-2]"), "needs low > 0"),
    "int log non-positive": (
        _replace("lr: {loguniform: [1.0e-5, 1.0e-2]}", "warmup_steps: {int: [0, 9], log: true}"),
        "needs low > 0"),
    "empty choice": (_replace("lr: {loguniform: [1.0e-5, 1.0e-2]}", "lr: {choice: []}"),
                     "at least one value"),
    "unknown precision in space": (
        _replace("lr: {loguniform", "precision: {choice: [fp32, fp8]}\n  lr: {loguniform"),
        "precision"),
    "unknown precision via --set": (
        lambda t: ["sweep", _space(t, GOOD), "--set", "precision=fp8"], "precision"),
    "--set without =": (lambda t: ["sweep", _space(t, GOOD), "--set", "lr"], "expected key=value"),
    "grid with optuna": (
        lambda t: ["sweep", _space(t, GOOD.replace("random", "optuna").replace(
            "loguniform: [1.0e-5, 1.0e-2]", "grid: [1.0e-5, 1.0e-2]"))],
        "'grid' needs search.algorithm"),
    "fixed and searched": (_fixed("lr: 0.001"), "both fixed and searched"),
    "unknown trial": (lambda t: ["sweep", _space(t, "trial: sana\n" + GOOD.split("\n", 1)[1])],
                      "unknown trial 'sana'"),
    "missing space file": (lambda t: ["sweep", str(t / "nope.yaml")], "no such space file"),
    "negative lr via --set": (lambda t: ["sweep", _space(t, GOOD), "--set", "steps=-3"],
                              "key 'steps'"),
    "cuda without a GPU": (_replace("device: cpu", "device: cuda"), "device 'cuda'"),
    "missing checkpoint folder": (_model(lambda t: t / "no-such-model"), "no such folder"),
    "checkpoint without config.json": (_model(lambda t: _checkpoint(t, config=None)),
                                       "no config.json"),
    "corrupt checkpoint config": (_model(lambda t: _checkpoint(t, config="{not json")),
                                  "not JSON"),
    "checkpoint lacks the variant": (
        lambda t: ["sweep", _space(t, GOOD.replace(
            "model: sana-tiny", f"model: {_checkpoint(t)}, variant: bf16"))],
        "no diffusion_pytorch_model.bf16.safetensors"),
    "unknown builtin dataset": (_data(lambda t: "builtin:cats"), "builtin:shapes"),
    "data folder missing": (_data(lambda t: t / "nowhere"), "no such folder"),
    "corrupt cache": (_data(_corrupt_cache), "corrupt encoded dataset"),
    "cache without validation rows": (_data(_encoded_without_val), "validation rows"),
    "resume with a different space": (_run_dir_of_other_space, "the space differs"),
    "resume with nothing to resume": (
        lambda t: ["sweep", _space(t, GOOD), "--storage", str(t / "empty"), "--resume"],
        "no earlier run"),
    "storage not writable": (_not_writable_storage, "not writable"),
    "resume a folder that is not a run": (lambda t: ["resume", str(t)], "not a tune-sana run"),
    "trial: unknown key": (lambda t: ["trial", "--set", "lrr=1e-3"], "did you mean 'lr'"),
    "trial: bad value": (lambda t: ["trial", "--set", "lr=-1"], "key 'lr'"),
    "trial: malformed config file": (
        lambda t: ["trial", "--config", _space(t, "lr: [1e-3\n")], "malformed YAML"),
    "trial: cuda without a GPU": (
        lambda t: ["trial", "--set", "device=cuda", "--set", "model=sana-tiny"], "no CUDA GPU"),
    # Nothing to search: one line before Ray starts, naming the file and the fix.
    "empty space file": (lambda t: ["sweep", _space(t, "")], "space.yaml: nothing to search"),
    "space file of comments only": (lambda t: ["sweep", _space(t, "# to do\n")],
                                    "add a key under space:"),
    "no space with another trial": (lambda t: ["sweep", _space(t, "trial: synthetic\n")],
                                    "nothing to search"),
    "no space with algorithm random": (_replace(_LR, ""), "tune-sana trial"),
    "--set fixes the only searched key": (
        lambda t: ["sweep", _space(t, GOOD), "--set", "lr=1e-3"], "--set lr fixed"),
    # Every dimension against its key's type, both bounds.
    "float range on an integer key": (_searched("steps: {uniform: [100, 200]}"),
                                      "use int: [100, 200]"),
    "log range on an integer key": (_searched("batch_size: {loguniform: [2, 64]}"),
                                    "use int: [2, 64], log: true"),
    "range on a text key": (_searched("precision: {uniform: [0, 1]}"), "use choice"),
    "int range on a bool key": (_searched("attention_fp32: {int: [0, 1]}"),
                                "use choice: [false, true]"),
    "high bound out of range": (_searched("adam_beta2: {uniform: [0.9, 1.5]}"),
                                "key 'adam_beta2' = 1.5"),
    "int high bound out of range": (_searched("adam_beta1: {int: [0, 1]}"),
                                    "key 'adam_beta1' = 1"),
    "numbers as choices on a bool key": (_searched("attention_fp32: {choice: [0, 1]}"),
                                         "0 is not true or false"),
    "floats as choices on an integer key": (_searched("warmup_steps: {grid: [0.0, 10.0]}"),
                                            "0.0 is not an integer"),
    "bool as a choice on a float key": (_searched("max_grad_norm: {choice: [null, true]}"),
                                        "True is not a number"),
    "grace period beyond the steps": (_replace("type: fifo", "type: asha, grace_period: 10"),
                                      "scheduler.grace_period 10 is more than the 5 steps"),
    # Multi-worker trials (tests/test_workers_ray.py: workers that cannot fit the cluster).
    "no workers": (_replace("scheduler:", "resources: {workers: 0}\nscheduler:"),
                   "resources.workers"),
    "unknown parallel mode": (_replace("scheduler:", "resources: {workers: 2, parallel: tp}\n"
                                       "scheduler:"), "resources.parallel"),
    "fsdp with came": (_fixed_resources("optimizer: came", "{workers: 2, parallel: fsdp}"),
                       "optimizer came with resources.parallel fsdp"),
    # A run name is one folder under --storage, never a way out of it (tests/test_names.py).
    "name that climbs out of the storage": (_named("../x"), "--name '../x': a run name must"),
    "name with a separator": (_named("a/b"), "--name 'a/b': a run name must be one folder"),
    "empty name": (_named(""), "--name '': a run name must be one folder name"),
    "name a URI decodes to ..": (_named("%2e%2e", uri=True), "--name '%2e%2e': a run name"),
    # Checkpoints: another model, pickled weights, a weights file that is not safetensors.
    "checkpoint of another architecture": (
        _model(lambda t: _checkpoint(t, config='{"_class_name": "UNet2DConditionModel"}')),
        "describes a UNet2DConditionModel, not a SanaTransformer2DModel"),
    "checkpoint with only pickled weights": (_model(_pickled_checkpoint),
                                             "found diffusion_pytorch_model.bin"),
    "checkpoint weights that are not safetensors": (_model(lambda t: _checkpoint(t)),
                                                    "is not a safetensors file"),
    # Data that is neither a folder of images nor a manifest that reads.
    "data a file of another kind": (_data(lambda t: _file(t, "notes.txt", b"a, b")),
                                    "a manifest must end in .jsonl or .parquet"),
    "data a manifest that is not Parquet": (_data(lambda t: _file(t, "m.parquet", b"PAR1?")),
                                            "not a readable Parquet file"),
    # Storage: a URI whose folder cannot be made (an unknown scheme: CLI_CASES).
    "storage URI not writable": (
        lambda t: ["sweep", _space(t, GOOD), "--storage", _blocker(t).as_uri()],
        "cannot create the folder"),
    # Cluster addresses answer in bounded time: a closed port is refused at once.
    "address with a closed port": (_address(lambda port: f"127.0.0.1:{port}"),
                                   "no Ray head answers"),
    "ray client address with a closed port": (_address(lambda port: f"ray://127.0.0.1:{port}"),
                                              "no Ray head answers"),
    "dashboard address": (_address(lambda port: f"http://127.0.0.1:{port}"),
                          "a dashboard address is for 'ray job submit"),
    "address with no such port": (_address(lambda port: "127.0.0.1:70000"),
                                  "port 70000 is not a TCP port"),
    # Values near their limits.
    "lr 0": (_replace(_LR, "  lr: {choice: [0.0, 1.0e-3]}\n"), "key 'lr' = 0.0"),
    "lr infinite": (_replace("[1.0e-5, 1.0e-2]", "[1.0e-5, .inf]"),
                    "key 'lr' = inf: Input should be a finite number"),
    "lr not a number": (_replace(_LR, "  lr: {choice: [.nan]}\n"),
                        "key 'lr' = nan: Input should be a finite number"),
    "lr 1e308": (_replace("[1.0e-5, 1.0e-2]", "[1.0e-5, 1.0e+308]"),
                 "key 'lr' = 1e+308: Input should be less than or equal to 1000"),
    "steps 0": (_replace("steps: 5", "steps: 0"), "key 'steps'"),
    "batch larger than the dataset": (_fixed("batch_size: 1000"),
                                      "has 640 training samples; lower batch_size"),
    "searched batch larger than the dataset": (
        _searched("batch_size: {int: [8, 4096], log: true}"), "4096 samples per step"),
    "accumulated batch larger than the dataset": (
        _fixed("batch_size: 64, grad_accum_steps: 20"), "= 1280 samples per step"),
    "space file that is not text": (lambda t: ["sweep", str(_file(t, "s.yaml", b"\xff\xfe\x00"))],
                                    "not UTF-8 text"),
}


def _refused(args: list[str], needle: str, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> None:
    """``tune-sana args`` (run in ``tmp_path``) ends in one line naming ``needle`` on stderr,
    exit status 2, no traceback, and no new file under ``tmp_path`` (an empty folder, e.g. the
    storage root, may stay)."""
    before = {p for p in tmp_path.rglob("*")}
    try:
        code = main(args)
    except SystemExit as stop:  # argparse: a flag's value of the wrong type
        code = stop.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert err.startswith("tune-sana: error: ") and "\n" not in err, err
    assert needle in err, err
    assert "Traceback" not in captured.out + captured.err
    created = [p for p in {p for p in tmp_path.rglob("*")} - before if not p.is_dir()]
    assert not created, created


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_args, needle = CASES[case]
    args = make_args(tmp_path)
    monkeypatch.chdir(tmp_path)
    _refused(args, needle, tmp_path, capsys)


# --- every key of a trial config: tune-sana trial --set key=<a value it refuses> -------------

TRIAL_VALUES: dict[str, str] = {
    "model": "[1, 2]", "variant": "fp8", "data": "[1]", "steps": "0", "batch_size": "0",
    "seed": "-1", "lr": "0", "lr_schedule": "sawtooth", "warmup_steps": "-1",
    "max_grad_norm": "0", "optimizer": "sgd", "weight_decay": "-0.1", "adam_beta1": "1.0",
    "adam_beta2": "1.5", "adam_eps": "0", "came_beta3": "1", "came_eps1": "0",
    "came_eps2": "-1", "grad_accum_steps": "0", "gradient_checkpointing": "maybe",
    "precision": "fp8", "attention_fp32": "maybe", "finetune": "partial", "lora_rank": "0",
    "lora_alpha": "0", "lora_targets": "to_q,,to_k", "eval_every": "0",
    "checkpoint_every": "0", "val_batch_size": "0", "val_draws": "0", "sample_steps": "-1",
    "on_nonfinite": "ignore",
    "max_skips": "-1", "loss_spike_factor": "1", "min_loss_scale": "0",
    "damage_tolerance": "-0.1", "collapse_factor": "1", "collapse_patience": "0",
    "logit_mean": "mean", "logit_std": "0", "flow_shift": "0", "device": "tpu", "threads": "0",
}


def test_every_trial_key_has_a_case() -> None:
    assert set(TRIAL_VALUES) == set(TRIAL_KEYS)


@pytest.mark.parametrize("key", sorted(TRIAL_VALUES))
def test_every_trial_key_refuses_a_bad_value(key: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _refused(["trial", "--set", f"{key}={TRIAL_VALUES[key]}"], f"key '{key}'", tmp_path, capsys)


# --- every key of a space file: GOOD with one key set to a value it refuses -------------------
# "space.<key>.<distribution>": the searched key given only that distribution.

SPACE_VALUES: dict[str, tuple[Any, str]] = {
    "trial": (["sana_finetune"], "key 'trial'"),
    "metric": ("val_los", "metric 'val_los' (did you mean 'val_loss'?)"),
    "mode": ("maximize", "key 'mode'"),
    "max_retries": (-1, "key 'max_retries'"),
    "fixed": (["steps"], "key 'fixed'"),
    "space": (["lr"], "key 'space'"),
    "search": ("random", "key 'search'"),
    "search.algorithm": ("bayes", "key 'search.algorithm'"),
    "search.num_samples": (0, "key 'search.num_samples'"),
    "search.seed": (-1, "key 'search.seed'"),
    "search.max_concurrent": (0, "key 'search.max_concurrent'"),
    "search.points_to_evaluate": ([{"lrr": 1e-3}], "'lrr' is not a searched key"),
    "search.confirm": ("yes", "key 'search.confirm'"),
    "search.confirm.top_k": (0, "key 'search.confirm.top_k'"),
    "search.confirm.seeds": (0, "key 'search.confirm.seeds'"),
    "search.frontier": ({"seeds": 2}, "search.frontier applies to search.algorithm frontier"),
    "search.frontier.tolerance": (1.0, "key 'search.frontier.tolerance'"),
    "search.frontier.seeds": (0, "key 'search.frontier.seeds'"),
    "search.max_diverged": (1.5, "key 'search.max_diverged'"),
    "scheduler": ("asha", "key 'scheduler'"),
    "scheduler.type": ("hyperband", "key 'scheduler.type'"),
    "scheduler.grace_period": (0, "key 'scheduler.grace_period'"),
    "scheduler.reduction_factor": (1, "key 'scheduler.reduction_factor'"),
    "scheduler.max_t": (0, "key 'scheduler.max_t'"),
    "resources": (1, "key 'resources'"),
    "resources.workers": (2000, "key 'resources.workers'"),
    "resources.parallel": ("tp", "key 'resources.parallel'"),
    "resources.cpu": (0, "key 'resources.cpu'"),
    "resources.gpu": (-1, "key 'resources.gpu'"),
    "resources.custom": ({"node": "many"}, "key 'resources.custom.node'"),
    "resources.gpu_memory_gb": (0, "key 'resources.gpu_memory_gb'"),
    "space.lr.loguniform": ([0.0, 1e-2], "needs low > 0"),
    "space.lr.uniform": ([1e-2, 1e-3], "empty or inverted"),
    "space.warmup_steps.int": ([0, "nine"], "key 'space.warmup_steps.int.1'"),
    "space.warmup_steps.log": ("maybe", "key 'space.warmup_steps.log'"),
    "space.lr.choice": (1e-3, "key 'space.lr.choice'"),
    "space.lr.grid": ([], "grid needs at least one value"),
}


def _spec_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key a space file can hold, dotted (a section's keys under its own name)."""
    keys = set()
    for name, info in model.model_fields.items():
        keys.add(prefix + name)
        for inner in typing.get_args(info.annotation) or (info.annotation,):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys |= _spec_keys(inner, f"{prefix}{name}.")
    return keys


def test_every_space_file_key_has_a_case() -> None:
    # _spec_keys lists a dimension's keys as space.<distribution>; a file has space.<key>.<...>
    keys = {k for k in _spec_keys(SweepSpec) if not k.startswith("space.")}
    assert {k for k in SPACE_VALUES if not k.startswith("space.")} == keys
    assert {k.rsplit(".", 1)[1] for k in SPACE_VALUES if k.startswith("space.")} == set(
        Dimension.model_fields)


def _with(dotted: str, value: Any) -> str:
    """GOOD with ``dotted`` set to ``value`` (a dimension key: that key searched only so)."""
    spec = yaml.safe_load(GOOD)
    if dotted.startswith("space."):
        _, key, kind = dotted.split(".")
        dim = {"int": [1, 9], kind: value} if kind == "log" else {kind: value}
        spec["space"] = {key: dim}
        return yaml.safe_dump(spec)
    *sections, last = dotted.split(".")
    node = spec
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = value
    return yaml.safe_dump(spec)


@pytest.mark.parametrize("key", sorted(SPACE_VALUES))
def test_every_space_file_key_refuses_a_bad_value(key: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    value, needle = SPACE_VALUES[key]
    monkeypatch.chdir(tmp_path)
    _refused(["sweep", _space(tmp_path, _with(key, value))], needle, tmp_path, capsys)


# --- every CLI flag (and positional) of every command ------------------------------------------

def _run_dir(tmp: Path) -> Path:
    from tune_sana.testing.sweeps import write_small_sweep

    return write_small_sweep(tmp / "run")


def _resumable(tmp: Path) -> Path:
    """A run folder holding only the sweep.yaml a sweep of GOOD writes (resume reads that)."""
    run = tmp / "runs" / "old"
    run.mkdir(parents=True)
    (run / "sweep.yaml").write_text(parse_spec(yaml.safe_load(GOOD), "GOOD").to_yaml())
    return run


def _sweep(*flags: str) -> Callable[[Path], list[str]]:
    return lambda t: ["sweep", _space(t, GOOD), "--storage", str(t / "runs"), *flags]


def _resume(*flags: str) -> Callable[[Path], list[str]]:
    return lambda t: ["resume", str(_resumable(t)), *flags]


def _report(*flags: str) -> Callable[[Path], list[str]]:
    return lambda t: ["report", str(_run_dir(t)), *flags]


def _best(*flags: str) -> Callable[[Path], list[str]]:
    return lambda t: ["best", str(_run_dir(t)), *flags]


def _export(*flags: str) -> Callable[[Path], list[str]]:
    return lambda t: ["export", str(_run_dir(t)), "--trial", "t01", *flags]


def _images(tmp: Path) -> Path:
    from PIL import Image

    images = tmp / "images"
    images.mkdir()
    for name in ("a", "b"):  # a cache needs a training and a validation sample
        Image.new("RGB", (64, 64)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text("a black square")
    return images


# Placeholders in a case's arguments: the tiny pipeline (module fixture), a path under a file.
PIPELINE, BLOCKER = "{pipeline}", "{blocker}"


def _cache(*flags: str) -> Callable[[Path], list[str]]:
    """tune-sana cache of a two-image folder with the tiny pipeline."""
    return lambda t: ["cache", str(_images(t)), "--model", PIPELINE, *flags]

CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "trial --config": (lambda t: ["trial", "--config", str(t / "nope.yaml")], "cannot read"),
    "trial --set": (lambda t: ["trial", "--set", "=1e-4"], "expected key=value"),
    "make-base --out": (lambda t: ["make-base", "--out", str(_blocker(t))], "cannot write"),
    "make-base --steps": (lambda t: ["make-base", "--steps", "0", "--out", str(t / "b")],
                          "--steps 0: the base needs at least 1"),
    "make-base --force": (lambda t: ["make-base", "--force=yes"], "ignored explicit argument"),
    "sweep space": (lambda t: ["sweep", str(t / "nope.yml")], "no such space file"),
    "sweep --set": (_sweep("--set", "scheduler.type=hyperband"), "key 'scheduler.type'"),
    "sweep --name": (_sweep("--name", ".hidden"), "--name '.hidden': a run name"),
    "sweep --storage": (_sweep("--storage", "foo://bucket/runs"),
                        "not a storage URI that pyarrow understands"),
    "sweep --resume": (_sweep("--resume", "--name", "never-ran"), "is not a tune-sana run"),
    "sweep --address": (_sweep("--address", "head"), "--address head: expected host:port"),
    "sweep --num-cpus": (_sweep("--num-cpus", "0"), "--num-cpus 0: must be at least 1"),
    "sweep --num-gpus": (_sweep("--num-gpus", "-1"), "--num-gpus -1: must be at least 0"),
    "sweep --dashboard": (_sweep("--dashboard=yes"), "ignored explicit argument"),
    "sweep --progress-every": (_sweep("--progress-every", "-5"), "--progress-every -5"),
    "sweep --report-every": (_sweep("--report-every", "nan"), "--report-every nan"),
    "sweep --track": (_sweep("--track", "nope"), "--track nope: unknown tracker; choose from"),
    "sweep --warm-start": (lambda t: _sweep("--warm-start", str(t))(t),
                           "--warm-start: search.algorithm is random"),
    "resume run_dir": (lambda t: ["resume", str(t / "missing")], "not a tune-sana run"),
    "resume --address": (_resume("--address", "127.0.0.1:http"), "expected host:port"),
    "resume --num-cpus": (_resume("--num-cpus", "-2"), "--num-cpus -2: must be at least 1"),
    "resume --num-gpus": (_resume("--num-gpus", "two"), "invalid int value: 'two'"),
    "resume --dashboard": (_resume("--dashboard=1"), "ignored explicit argument"),
    "resume --progress-every": (_resume("--progress-every", "-1"), "--progress-every -1"),
    "resume --report-every": (_resume("--report-every", "soon"), "invalid float value"),
    "report run_dirs": (lambda t: ["report", str(t)], "not a tune-sana run directory"),
    "report --top": (_report("--top", "0"), "--top 0: must be at least 1"),
    "report --plots": (lambda t: ["report", str(_run_dir(t)), "--plots", str(_blocker(t))],
                       "--plots"),
    "report --html": (lambda t: ["report", str(_run_dir(t)), "--html",
                                 str(_blocker(t) / "r.html")], "--html"),
    "report --skip-corrupt": (_report("--skip-corrupt=all"), "ignored explicit argument"),
    "best run_dir": (lambda t: ["best", str(t)], "not a tune-sana run directory"),
    "best --format": (_best("--format", "xml"), "invalid choice: 'xml'"),
    "best --frontier": (lambda t: ["best", str(_run_dir(t)), "--frontier", str(t / "run")],
                        "no frontier.parquet there"),
    "best --margin": (_best("--margin", "0.5"), "--margin 0.5 needs --frontier"),
    "cache data": (lambda t: ["cache", str(t / "nowhere"), "--model", PIPELINE],
                   "no such folder or manifest file"),
    "cache --model": (lambda t: ["cache", str(_images(t)), "--model", "sana-tiny"],
                      "has no image or text encoder"),
    "cache --resolution": (_cache("--resolution", "4"), "cache option 'resolution'"),
    "cache --size-policy": (_cache("--size-policy", "pad"), "invalid choice: 'pad'"),
    "cache --allow-upscale": (_cache("--allow-upscale=no"), "ignored explicit argument"),
    "cache --max-sequence-length": (_cache("--max-sequence-length", "1"),
                                    "cache option 'max_sequence_length'"),
    "cache --no-complex-human-instruction": (_cache("--no-complex-human-instruction=1"),
                                             "ignored explicit argument"),
    "cache --val-fraction": (_cache("--val-fraction", "1.5"), "cache option 'val_fraction'"),
    "cache --val-max": (_cache("--val-max", "0"), "cache option 'val_max'"),
    "cache --variant": (_cache("--variant", "fp8"), "variant 'fp8'"),
    "cache --skip-bad": (_cache("--skip-bad=yes"), "ignored explicit argument"),
    "cache --batch-size": (_cache("--batch-size", "0"), "cache option 'batch_size'"),
    "cache --device": (_cache("--device", "tpu"), "invalid choice: 'tpu'"),
    "cache --cache-root": (lambda t: ["cache", str(_images(t)), "--model", PIPELINE,
                                      "--cache-root", str(_blocker(t))], "--cache-root"),
    "export run_dir": (lambda t: ["export", str(t), "--trial", "t01"],
                       "not a tune-sana run directory"),
    "export --trial": (lambda t: ["export", str(_run_dir(t)), "--trial", "t99"],
                       "no trial 't99'"),
    "export --out": (_export("--out", BLOCKER), "--out"),
    "export --device": (_export("--device", "tpu"), "invalid choice: 'tpu'"),
    "export --force": (_export("--force=1"), "ignored explicit argument"),
}


def _flags() -> set[str]:
    """'<command> <flag or positional>' of every option of every command."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
            for name, parser in sub.choices.items() for a in parser._actions
            if not isinstance(a, argparse._HelpAction)}


def test_every_cli_flag_has_a_case() -> None:
    assert set(CLI_CASES) == _flags()


@pytest.mark.parametrize("flag", sorted(CLI_CASES))
def test_every_cli_flag_refuses_a_bad_value(flag: str, pipeline: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make_args, needle = CLI_CASES[flag]
    fill = {PIPELINE: str(pipeline), BLOCKER: str(_blocker(tmp_path))}
    args = [fill.get(a, a) for a in make_args(tmp_path)]
    monkeypatch.chdir(tmp_path)
    _refused(args, needle, tmp_path, capsys)


def test_the_corpus_is_large_enough() -> None:
    cases = (len(CASES) + len(DATASET_CASES) + len(TRIAL_VALUES) + len(SPACE_VALUES)
             + len(CLI_CASES) + 1)  # + the GPU-resources case below
    assert cases >= 218


def test_gpu_resources_on_a_cpu_cluster_fail_before_any_trial(tmp_path: Path) -> None:
    space = _space(tmp_path, GOOD.replace("fixed:", "resources: {cpu: 1, gpu: 0.5}\nfixed:"))
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", space, "--storage", str(tmp_path / "r"),
         "--num-cpus", "1", "--num-gpus", "0"],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tune-sana: error: resources.gpu is 0.5 but the Ray cluster has no GPU")
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / "r").glob("*/sweep.yaml"))
