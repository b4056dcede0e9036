"""Build the demo base checkpoint: the tiny Sana pretrained on the built-in data's pretraining part
(shapes on a dark background; the demo then fine-tunes it on shapes on paper, see data.encoded).

Saved in diffusers format with fp32 weights plus ``fp16`` and ``bf16`` variants, so the demo
sweep fine-tunes a real checkpoint and can cross checkpoint variant with precision mode, as users
of the FP16 and BF16 Sana releases do. The folder carries DEMO_BASE_VERSION
(data.checkpoints.demo_base_path), so a base built by an older version is rebuilt, not reused.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tune_sana.config import LrSchedule
from tune_sana.data.checkpoints import demo_base_built, demo_base_path
from tune_sana.data.encoded import load_data
from tune_sana.training.flow import flow_loss, make_batch
from tune_sana.training.models import tiny_model
from tune_sana.training.runtime import Batches
from tune_sana.training.schedule import lr_factor

PRETRAIN_STEPS = 1500
PRETRAIN_LR = 2e-3
PRETRAIN_SEED = 7


def pretrain(steps: int = PRETRAIN_STEPS, log_every: int = 250) -> torch.nn.Module:
    """fp32 AdamW with a short warmup and cosine decay on the pretraining split."""
    data = load_data("builtin:shapes", part="pretrain")
    model = tiny_model(seed=PRETRAIN_SEED)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    warmup = max(1, steps // 20)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(LrSchedule.COSINE, warmup, steps))
    batches = Batches(data.train, batch_size=32, seed=PRETRAIN_SEED)
    gen = torch.Generator().manual_seed(PRETRAIN_SEED)
    started = time.perf_counter()
    for step in range(steps):
        loss = flow_loss(model, make_batch(batches.next(), gen, 0.0, 1.0, 1.0), torch.float32)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"make-base: step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    return model


def make_base(out: Path | None = None, steps: int = PRETRAIN_STEPS, force: bool = False) -> Path:
    """Pretrain and save (atomically: a temp folder renamed into place). Returns the folder."""
    target = out or demo_base_path()
    if (target / "config.json").is_file() and not force:
        return target
    model: Any = pretrain(steps)  # a diffusers ModelMixin: has save_pretrained
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(fp16) warns about keep-in-fp32 modules: none here
    try:
        model.save_pretrained(tmp)
        # each variant rounds the fp32 weights once (Module.to is in place: chaining would
        # store the bf16 variant as fp32 -> fp16 -> bf16)
        for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            copy.deepcopy(model).to(dtype).save_pretrained(tmp, variant=variant)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_demo_base() -> Path:
    """The demo base folder, built first (one to two minutes on a CPU) if it is missing."""
    target = demo_base_path()
    if not demo_base_built():
        print(f"tune-sana: building the demo base checkpoint once at {target} "
              "(tiny Sana pretrained on the built-in data, 1-2 min)", file=sys.stderr, flush=True)
        make_base(target)
    return target
