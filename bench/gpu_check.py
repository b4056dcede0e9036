"""The real data path and GPU code paths, end to end, in under 10 minutes on one CUDA GPU.

    .venv/bin/python bench/gpu_check.py [--model <Sana pipeline folder>] [--images <dir>]
                                        [--work DIR] [--steps 20] [--budget-s 540]

1. model: the given Sana pipeline folder (vae/, text_encoder/, tokenizer/, transformer/), or
   a random Sana-shaped one built here: 2 transformer layers at the 0.6B widths (36 x 32 heads,
   cross-attention 16 x 72, caption 2304), the DC-AE f32c32 config with one layer per stage
   (32x downsampling, 32 latent channels, real widths), a 2-layer Gemma-2 at 2B widths (hidden
   2304, 8 heads x 256, 4 KV heads) with a character tokenizer; transformer saved with fp16 and
   bf16 variants.
   The built model works at 512 px: transformer sample_size 16 x the DC-AE's 32x = 512, so the
   generated images are 512 px and the cache's latents 32 x 16 x 16 (summary ``latent_512px``).
2. images: the given folder (x.png + x.txt), or ``--n-images`` generated ones.
3. cache: ``encode.build_cache`` on the GPU, timed; then again, which must load no encoder.
4. the matrix: each of the five precision modes x optimizer (adamw, came; came needs
   came-pytorch) x gradient_checkpointing (off, on), 20 short trials in this process on the
   cache, + one LoRA trial. Per run: outcome, val loss, steps/s, peak memory
   (``peak_memory_mb``, ``peak_memory_kind``: cuda_max_allocated on a GPU, the process's peak
   RSS on a CPU) against preflight's estimate of the trial's tensors
   (``training.memory.estimate`` on the transformer's config.json and the cache's DataShape:
   ``estimate_mb``, ``memory_ratio`` = measured / estimate; meaningful on a GPU only: a CPU's
   RSS holds the whole process). A run that raises is recorded, not fatal. Keys of ``modes``:
   "<precision> <optimizer> gc|no-gc".
5. ``tune-sana sweep search_spaces/stability.yaml`` with 2 trials sharing the GPU (FIFO, the
   steps above), as a subprocess; its trials.parquet outcomes.

Stages past ``--budget-s`` are skipped (and say so): a stage-4 run starts only with 60 s left
beyond ``--sweep-reserve-s`` (kept for stage 5 unless ``--skip-sweep``), the sweep with 90 s.
The last line printed is one JSON object (``memory``: each run's measured/estimate ratios).
``--dry-run`` prints the plan without touching a GPU; ``--scale tiny --device cpu`` builds the
pipeline at test size and runs every stage on the CPU to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("fp32", "fp16-amp", "bf16-amp", "fp16", "bf16")
NATIVE = {"fp32": None, "fp16-amp": "fp16", "bf16-amp": "bf16", "fp16": "fp16", "bf16": "bf16"}
OPTIMIZERS = ("adamw", "came")
CHECKPOINTING = (False, True)
MIB = 1024**2


def matrix() -> list[tuple[str, str, bool]]:
    """Stage 4's runs: (precision, optimizer, gradient_checkpointing)."""
    return [(mode, opt, gc) for mode in MODES for opt in OPTIMIZERS for gc in CHECKPOINTING]


def label(mode: str, optimizer: str, checkpointing: bool) -> str:
    return f"{mode} {optimizer} {'gc' if checkpointing else 'no-gc'}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Sana pipeline folder (default: build a random one)")
    parser.add_argument("--variant", help="transformer variant for every trial with --model "
                        "(default: the folder's default weights)")
    parser.add_argument("--images", help="image folder with x.txt captions (default: generate)")
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--resolution", type=int, help="default: the checkpoint's")
    parser.add_argument("--work", default="gpu-check", help="working folder (default ./gpu-check)")
    parser.add_argument("--steps", type=int, default=20, help="steps per trial")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "stability.yaml"))
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip stages that would start after this many seconds")
    parser.add_argument("--sweep-timeout-s", type=float, default=300.0)
    parser.add_argument("--sweep-reserve-s", type=float, default=120.0,
                        help="budget seconds stage 4 leaves for the sweep (unless --skip-sweep)")
    parser.add_argument("--scale", choices=["real", "tiny"], default="real",
                        help="size of the built pipeline (tiny: test size, to check the script)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.n_images < 4 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1 and --n-images >= 4")
    return args


# --- the random Sana-shaped pipeline --------------------------------------------------------

def transformer_config(scale: str) -> dict[str, Any]:
    if scale == "tiny":
        from tune_sana.testing.tiny_sana import tiny_transformer

        config: dict[str, Any] = dict(tiny_transformer().config)
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return {  # Sana_600M at 512 px, 2 of its 28 layers
        "in_channels": 32, "out_channels": 32, "num_attention_heads": 36,
        "attention_head_dim": 32, "num_layers": 2, "num_cross_attention_heads": 16,
        "cross_attention_head_dim": 72, "cross_attention_dim": 1152, "caption_channels": 2304,
        "mlp_ratio": 2.5, "sample_size": 16, "patch_size": 1, "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def vae(scale: str) -> Any:
    from diffusers import AutoencoderDC

    if scale == "tiny":
        from tune_sana.testing.tiny_sana import tiny_vae

        return tiny_vae()
    vit = ("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
           "EfficientViTBlock")
    return AutoencoderDC(  # dc-ae-f32c32-sana-1.0 with one layer per stage
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=vit, decoder_block_types=vit,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types=("batch_norm", "batch_norm", "batch_norm", "rms_norm", "rms_norm",
                            "rms_norm"),
        decoder_act_fns=("relu", "relu", "relu", "silu", "silu", "silu"),
        scaling_factor=0.41407,
    )


def build_pipeline(folder: Path, scale: str) -> Path:
    """Save a random Sana-shaped pipeline (seeded) with fp16/bf16 transformer variants."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from tune_sana.testing.tiny_sana import tiny_text_encoder, tiny_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    if scale == "tiny":
        text_encoder = tiny_text_encoder(len(tokenizer))
    else:
        from transformers import Gemma2Config, Gemma2Model

        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=2304, intermediate_size=9216,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
            max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    transformer: Any = SanaTransformer2DModel(**transformer_config(scale))
    pipe: Any = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae(scale),
                        transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp)
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        transformer.to(dtype).save_pretrained(tmp / "transformer", variant=variant)
    tmp.rename(folder)
    return folder


# --- stages -----------------------------------------------------------------------------------

def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "cuda": torch.cuda.is_available()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return info


def build_cache(images: str, model: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tune_sana.data import cache as encode

    options: dict[str, Any] = {"cache_root": str(work / "cache"), "device": args.device,
                               "batch_size": 8}
    if args.resolution:
        options["resolution"] = args.resolution
    started = time.perf_counter()
    folder = encode.build_cache(images, model, **options)
    first = time.perf_counter() - started
    loads = dict(encode.LOADS)
    started = time.perf_counter()
    again = encode.build_cache(images, model, **options)
    meta = json.loads((folder / "meta.json").read_text())
    return {"folder": str(folder), "seconds": round(first, 2),
            "second_call_s": round(time.perf_counter() - started, 3),
            "second_call_no_op": again == folder and dict(encode.LOADS) == loads,
            "samples": meta["samples"], "train": meta["train"], "val": meta["val"],
            "resolution": meta["resolution"], "latent_shape": meta["latent_shape"],
            "text_shape": meta["text_shape"]}


def preflight_estimate(config: Any, model: str, data: str, device: str) -> dict[str, Any]:
    """Preflight's estimate of one trial's tensors (training/memory.py), from the transformer's
    config.json and the cache's shapes, as engine/preflight.py makes it."""
    from tune_sana.data.encoded import load_data
    from tune_sana.training.memory import DataShape, estimate
    from tune_sana.training.models import read_config

    found = estimate(config, read_config(model), DataShape.of(load_data(data)), device)
    return {"estimate_mb": round(found.total / MIB, 1), "estimate_phase": found.peak_phase}


def run_mode(model: str, data: str, mode: str, variant: str | None,
             args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """One short trial on the cache: its outcome, speed and peak memory against the estimate."""
    import torch

    from trials import sana_finetune
    from tune_sana.config import UserError, build_config

    values = {"model": model, "data": data, "precision": mode, "variant": variant,
              "steps": args.steps, "batch_size": args.batch_size, "eval_every": args.steps,
              "val_batch_size": 8, "lr": 1e-4, "max_grad_norm": 1.0, "device": args.device,
              **extra}
    result: dict[str, Any] = {}
    try:
        config = build_config(values, source=mode)
        result.update(preflight_estimate(config, model, data, args.device))
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = sana_finetune.run(config, lambda row: None)
    except (UserError, RuntimeError, ValueError, ImportError) as err:  # recorded: goes on
        return {"outcome": "error", "error": f"{type(err).__name__}: {err}"[:500], **result}
    keys = ("outcome", "divergence_cause", "diverged_step", "nonfinite_module", "final_val_loss",
            "steps_run", "steps_per_s", "peak_memory_mb", "peak_memory_kind", "pairing",
            "n_params")
    result.update({k: summary.get(k) for k in keys})
    peak, est = result.get("peak_memory_mb"), result.get("estimate_mb")
    result["memory_ratio"] = round(peak / est, 3) if peak and est else None
    return result


def run_matrix(model: str, data: str, args: argparse.Namespace,
               left: Callable[[], float]) -> dict[str, dict[str, Any]]:
    """Stage 4: every precision mode x optimizer x gradient_checkpointing, while the budget
    (less the sweep's reserve) lasts; the rest are recorded as skipped."""
    reserve = 0.0 if args.skip_sweep else args.sweep_reserve_s
    runs: dict[str, dict[str, Any]] = {}
    for mode, optimizer, checkpointing in matrix():
        name = label(mode, optimizer, checkpointing)
        if left() < 60 + reserve:
            runs[name] = {"outcome": "skipped", "error": "time budget"}
            continue
        variant = args.variant if args.model else NATIVE[mode]
        runs[name] = run_mode(model, data, mode, variant, args, optimizer=optimizer,
                              gradient_checkpointing=checkpointing)
        print(json.dumps({"run": name, **runs[name]}, default=str), flush=True)
    return runs


def run_sweep(model: str, data: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """2 trials of the space on the cache. A given --model runs its default weights (or
    --variant); the built pipeline has both variants, so the space's variant choice stays."""
    import yaml

    from tune_sana.record.readers import read_trials

    space = yaml.safe_load(Path(args.space).read_text()) or {}
    searched = set(space.get("space") or {})
    sets = {"model": model, "data": data, "steps": args.steps, "eval_every": args.steps,
            "device": args.device, "search.num_samples": 2, "search.max_concurrent": 2,
            "scheduler.type": "fifo", "resources.gpu": 0.5, "resources.cpu": 2}
    if args.model or "variant" not in searched:
        sets["variant"] = args.variant or "null"
    name = f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [str(Path(sys.executable).parent / "tune-sana"), "sweep", args.space,
               "--name", name, "--storage", str(work / "runs"), "--num-gpus", "1",
               "--progress-every", "30"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=args.sweep_timeout_s)
        rc, tail = done.returncode, (done.stderr or "")[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {args.sweep_timeout_s:.0f}s"
    result: dict[str, Any] = {"rc": rc, "seconds": round(time.perf_counter() - started, 1),
                              "run_dir": str(work / "runs" / name)}
    run_dir = work / "runs" / name
    if (run_dir / "trials.parquet").is_file():
        rows = read_trials(run_dir, ["trial_id", "precision", "lr", "outcome",
                                     "final_val_loss"]).to_pylist()
        result["trials"] = rows
    if rc != 0:
        result["stderr_tail"] = tail
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work).expanduser().resolve()
    plan = {"model": args.model or f"random Sana-shaped ({args.scale})",
            "images": args.images or f"{args.n_images} generated", "work": str(work),
            "modes": [label(*run) for run in matrix()] + ["lora (bf16-amp adamw no-gc)"],
            "sweep": None if args.skip_sweep else args.space, "steps": args.steps}
    if args.dry_run:
        print(json.dumps({"plan": plan}))
        return 0
    started = time.perf_counter()
    os.environ.setdefault("TUNE_SANA_HOME", str(work / "home"))
    summary: dict[str, Any] = {"plan": plan, "environment": environment(args.device)}
    if args.device == "cuda" and not summary["environment"]["cuda"]:
        summary.update(ok=False, error="no CUDA GPU visible (use --device cpu --scale tiny to "
                       "check the script itself)")
        print(json.dumps(summary))
        return 2

    def left() -> float:
        return float(args.budget_s) - (time.perf_counter() - started)

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model or str(build_pipeline(work / f"sana-{args.scale}", args.scale))
    summary["build_s"] = round(time.perf_counter() - t0, 1)
    images = args.images
    if images is None:
        from tune_sana.testing.tiny_sana import write_images

        size = args.resolution or (512 if args.scale == "real" else 16)
        images = str(work / "images")
        if not Path(images).is_dir():
            write_images(Path(images), args.n_images, size=size)
    summary["cache"] = build_cache(images, model, work, args)
    data = summary["cache"]["folder"]
    if args.scale == "real" and not args.model and not args.resolution:
        summary["latent_512px"] = (summary["cache"]["resolution"] == 512
                                   and list(summary["cache"]["latent_shape"]) == [32, 16, 16])

    summary["modes"] = run_matrix(model, data, args, left)
    summary["memory"] = {name: run.get("memory_ratio") for name, run in summary["modes"].items()}
    if left() >= 60 + (0.0 if args.skip_sweep else args.sweep_reserve_s):
        lora_variant = args.variant if args.model else "bf16"
        summary["lora"] = run_mode(model, data, "bf16-amp", lora_variant, args,
                                   finetune="lora", lora_rank=8, lr=1e-3)
    if not args.skip_sweep:
        if left() >= 90:
            summary["sweep"] = run_sweep(model, data, work, args)
        else:
            summary["sweep"] = {"skipped": "time budget"}
    failed = [m for m, r in summary["modes"].items() if r.get("outcome") in ("error", "skipped")]
    sweep_ok = args.skip_sweep or summary.get("sweep", {}).get("rc") == 0
    summary["ok"] = bool(summary["cache"]["second_call_no_op"] and not failed and sweep_ok
                         and summary.get("latent_512px", True))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
