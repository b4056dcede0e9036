"""Checks run on the driver before a sweep writes anything or starts a trial.

A bad checkpoint folder, dataset or device found inside a trial costs a Ray start and leaves a
half-made run directory; found here it is one line and exit status 2. Every value a trial could
take is checked: the fixed one and each choice of a searched key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_sana.config import DEMO_BASE, PRESETS, TrialConfig, UserError
from tune_sana.data.checkpoints import (
    TRANSFORMER_WEIGHTS,
    demo_base_built,
    has_weights,
    resolve_folder,
    weights_name,
)
from tune_sana.engine.space import TRAINER_CPU, TRIAL_CONFIG_TRIALS, SweepSpec, max_t

if TYPE_CHECKING:
    from tune_sana.training.memory import DataShape


def candidates(spec: SweepSpec, key: str) -> list[Any]:
    """Every value ``key`` can take in this sweep (continuous ranges are not listed)."""
    if key in spec.space:
        return spec.space[key].values()
    default = TrialConfig.model_fields[key].default
    value = spec.fixed.get(key, default)
    return [getattr(value, "value", value)]


def check_local(spec: SweepSpec) -> None:
    """Checks that need no Ray: checkpoints, variants, datasets, this machine's devices."""
    if spec.trial not in TRIAL_CONFIG_TRIALS:
        if spec.resources.workers > 1:
            raise UserError(f"resources.workers {spec.resources.workers}: trial '{spec.trial}' "
                            "runs on one worker only; set resources.workers 1")
        return
    if spec.resources.workers > 1 and spec.resources.parallel == "fsdp" and \
            "came" in candidates(spec, "optimizer"):
        from tune_sana.training.ranks import FSDP_CAME

        raise UserError(FSDP_CAME)
    variants = candidates(spec, "variant")
    for model in candidates(spec, "model"):
        if model in PRESETS:
            continue
        if model == DEMO_BASE and not demo_base_built():
            # Only to build it: importing training/demo_base (diffusers, through models.py)
            # costs the driver ~4 s on this 2-core box, every sweep.
            from tune_sana.training.demo_base import ensure_demo_base

            ensure_demo_base()
        path, subfolder = resolve_folder(str(model))
        folder = Path(path) / (subfolder or "")
        if folder.is_dir():
            _check_checkpoint_folder(str(model), folder, variants)
    shapes = {str(data): _check_data(str(data)) for data in candidates(spec, "data")}
    _check_devices(spec)
    _check_optimizers(spec)
    _check_fit(spec, shapes)
    _check_batches(spec, shapes)


def check_scheduler(spec: SweepSpec) -> None:
    """ASHA needs its grace period within the steps a trial runs (Ray asserts it)."""
    if spec.scheduler.type != "asha":
        return
    horizon = max_t(spec)
    if spec.scheduler.grace_period > horizon:
        raise UserError(f"scheduler.grace_period {spec.scheduler.grace_period} is more than the "
                        f"{horizon} steps a trial runs, so ASHA could never stop one; lower it "
                        f"(e.g. --set scheduler.grace_period={max(1, horizon // 3)}) or use "
                        "scheduler.type fifo")


_SANA_CLASS = "SanaTransformer2DModel"


def _check_checkpoint_folder(model: str, folder: Path, variants: list[Any]) -> None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"model '{model}': {folder / 'config.json'} is unreadable or not JSON "
                        f"({type(err).__name__}); re-save the checkpoint") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind is not None and kind != _SANA_CLASS:
        raise UserError(f"model '{model}': {folder / 'config.json'} describes a {kind}, not a "
                        f"{_SANA_CLASS}; point to a Sana checkpoint (its transformer/ folder)")
    for variant in variants:
        if not has_weights(folder, variant):
            name = weights_name(TRANSFORMER_WEIGHTS, variant)
            other = sorted(p.name for p in folder.glob(f"{TRANSFORMER_WEIGHTS}*.bin"))
            hint = (f" (found {other[0]}: only safetensors weights are read; re-save with "
                    "save_pretrained(safe_serialization=True))" if other else "")
            raise UserError(f"model '{model}': no {name} in {folder}{hint}; drop variant "
                            f"'{variant}' from the space or use a checkpoint that has it")
        _check_safetensors(model, folder / weights_name(TRANSFORMER_WEIGHTS, variant))


def _check_safetensors(model: str, path: Path) -> None:
    """The file starts as safetensors does: an 8-byte little-endian header length, then that
    many bytes of JSON (a sharded checkpoint's shards are not opened here)."""
    if not path.is_file():
        return  # sharded: an index.json names the shards
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise ValueError("no safetensors header")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
    except (OSError, ValueError) as err:
        raise UserError(f"model '{model}': {path} is not a safetensors file ({err}); re-save "
                        "the checkpoint with save_pretrained") from None


def _check_data(data: str) -> DataShape:
    from tune_sana.data.encoded import BUILTIN_PREFIX, load_data
    from tune_sana.training.memory import DataShape

    if data.startswith(BUILTIN_PREFIX):
        return DataShape.of(load_data(data))  # unknown built-in names fail here
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise UserError(f"data '{data}': no such folder; use builtin:shapes, an images folder "
                        "or a folder made by tune-sana cache")
    return DataShape.of(load_data(str(folder)))  # a corrupt or foreign folder: UserError


def _largest(spec: SweepSpec, key: str) -> int:
    """The largest value an integer key can take in this sweep (a range's high end)."""
    if key in spec.space:
        return max(int(v) for v in spec.space[key].extremes())
    return int(max(candidates(spec, key)))


def _check_batches(spec: SweepSpec, data: dict[str, DataShape]) -> None:
    """Each optimizer step's samples (batch_size x grad_accum_steps x workers) fit in the
    training set: a trial would silently take fewer than its recorded batch_size says."""
    per_step = (_largest(spec, "batch_size") * _largest(spec, "grad_accum_steps")
                * spec.resources.workers)
    for name, shape in data.items():
        if 0 < shape.train < per_step:
            raise UserError(f"batch_size x grad_accum_steps x resources.workers = {per_step} "
                            f"samples per step, but data '{name}' has {shape.train} training "
                            "samples; lower batch_size (or use a larger dataset)")


def _check_fit(spec: SweepSpec, data: dict[str, DataShape]) -> None:
    """Each trial fits in its share of a GPU, the worst searched combination too (engine/fit.py);
    model configs are read from config.json, no weights loaded. A hub id this machine cannot
    reach is not estimated (its trials would fail to load it with their own line)."""
    from tune_sana.engine import fit

    if fit.budget(spec) is None:
        return
    from tune_sana.training.models import read_config  # diffusers: only with a GPU budget
    configs: dict[str, dict[str, Any]] = {}
    for model in candidates(spec, "model"):
        try:
            configs[str(model)] = read_config(str(model))
        except UserError:
            continue
    fit.check_fit(spec, configs, data)


def _check_devices(spec: SweepSpec) -> None:
    import torch

    from tune_sana.config import Precision
    from tune_sana.training.precision import check_supported

    devices = set(candidates(spec, "device"))
    if "cuda" in devices and spec.resources.gpu == 0:
        raise UserError("device 'cuda' with resources.gpu 0: Ray would give trials no GPU; "
                        "set resources.gpu (e.g. 0.5 to share one GPU between two trials)")
    if torch.cuda.is_available() and devices & {"cuda", "auto"}:
        for mode in candidates(spec, "precision"):
            check_supported(Precision(mode), torch.device("cuda"))


def _check_optimizers(spec: SweepSpec) -> None:
    """Each optimizer the space can pick is installed; a CUDA-only one (adamw8bit) is refused
    where a trial would run on the CPU: device cpu, or auto with no GPU per trial (Ray hides the
    GPUs from a trial with resources.gpu 0). The trial refuses it with the same line."""
    import torch

    from tune_sana.training.optimizer import CUDA_ONLY, check_available

    devices = set(candidates(spec, "device"))
    on_cpu = "cpu" in devices or ("auto" in devices and spec.resources.gpu == 0)
    for name in candidates(spec, "optimizer"):
        check_available(str(name), torch.device("cpu") if on_cpu and name in CUDA_ONLY else None)


def check_cluster(spec: SweepSpec) -> None:
    """Checks against the Ray cluster's resources (after ray.init)."""
    import ray

    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0))
    cpus = float(total.get("CPU", 0))
    if spec.resources.gpu > 0 and gpus == 0:
        raise UserError(f"resources.gpu is {spec.resources.gpu} but the Ray cluster has no GPU; "
                        "run on a GPU machine or set resources.gpu 0 and device cpu")
    if spec.resources.gpu > gpus:
        raise UserError(f"resources.gpu {spec.resources.gpu} per trial exceeds the cluster's "
                        f"{gpus:g} GPUs: no trial could ever start")
    if spec.resources.cpu > cpus:
        raise UserError(f"resources.cpu {spec.resources.cpu:g} per trial exceeds the cluster's "
                        f"{cpus:g} CPUs: no trial could ever start; lower resources.cpu")
    _check_workers(spec, cpus, gpus)
    for name, amount in spec.resources.custom.items():
        have = float(total.get(name, 0))
        if amount > have:
            raise UserError(f"resources.custom.{name} {amount:g} per trial but the Ray cluster "
                            f"has {have:g}: no trial could ever start; start a node with "
                            f"ray start --resources '{{\"{name}\": N}}' or drop the key")
    if spec.trial in TRIAL_CONFIG_TRIALS and "cuda" in candidates(spec, "device") and gpus == 0:
        raise UserError("device 'cuda' but the Ray cluster has no GPU; use --set device=cpu")


def _check_workers(spec: SweepSpec, cpus: float, gpus: float) -> None:
    """A multi-worker trial holds all its workers at once (plus the Tune trial that starts
    them): if they cannot all fit, Ray Train waits for them forever (reference: hpo.md)."""
    res = spec.resources
    if res.workers == 1:
        return
    need_cpu, need_gpu = res.workers * res.cpu + TRAINER_CPU, res.workers * res.gpu
    if need_cpu > cpus or need_gpu > gpus:
        raise UserError(f"resources.workers {res.workers} x (cpu {res.cpu:g}, gpu {res.gpu:g}) "
                        f"plus {TRAINER_CPU:g} CPU for the trial needs {need_cpu:g} CPUs and "
                        f"{need_gpu:g} GPUs at once, but the cluster has {cpus:g} and {gpus:g}: "
                        "lower resources.workers or resources.cpu/gpu (e.g. cpu 0.5)")
