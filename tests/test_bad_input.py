"""The bad-input corpus: every case is one line naming what is wrong and the fix, exit status 2,
no traceback, and no run directory written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tune_sana.cli import main
from tune_sana.data.encoded import save_encoded, shapes_images

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


def _images_case(tmp: Path, pipe: Path, captions: bool) -> list[str]:
    from PIL import Image

    images = tmp / "images"
    images.mkdir()
    if not captions:
        Image.new("RGB", (64, 64)).save(images / "a.png")
    text = GOOD.replace("model: sana-tiny", f"model: {pipe}").replace(
        "device: cpu}", f"device: cpu, data: '{images}'}}")
    return ["sweep", _space(tmp, text)]


DATASET_CASES: dict[str, tuple[bool, str]] = {
    "dataset folder with no images": (True, "no usable samples"),
    "images without captions": (False, "missing caption x1: a.png"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_is_one_line_exit_2(case: str, pipeline: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    captions, needle = DATASET_CASES[case]
    code = main(_images_case(tmp_path, pipeline, captions))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tune-sana: error: ") and "\n" not in err, err
    assert needle in err and "Traceback" not in err
    assert not list(tmp_path.rglob("sweep.yaml"))


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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_args, needle = CASES[case]
    args = make_args(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    code = main(args)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert err.startswith("tune-sana: error: ") and "\n" not in err, err
    assert needle in err, err
    assert "Traceback" not in captured.out + captured.err
    created = {p for p in tmp_path.rglob("*")} - before
    written = [p for p in created if p.name in ("sweep.yaml", "trials.parquet", "history")]
    assert not written, written


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) + len(DATASET_CASES) + 1 >= 30


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
