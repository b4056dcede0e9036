"""A synthetic trial program that never checks its own health: a stand-in for third-party code.

    tune-sana sweep search_spaces/synthetic.yaml

Loss follows a noisy power-law curve whose speed depends on lr; above ``diverge_above`` lr (or
from step ``nan_from``) it reports NaN every step, as an unguarded training loop would. It costs
``step_seconds`` of sleep per step, so engine tests and benchmarks can model slow trials cheaply.
Takes a plain dict config and a ``report`` callable; never imports Ray.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

from tune_sana.outcomes import Outcome

DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "steps": 50,
    "seed": 0,
    "diverge_above": 1e-2,
    # The lr above which it diverges varies with the seed: diverge_above * 10**(spread * u),
    # u uniform in [-1, 1) drawn from the seed (0: the same for every seed).
    "diverge_spread": 0.0,
    "nan_from": None,
    "step_seconds": 0.0,
    "eval_every": 5,
    "allocate_gb": None,  # allocate this much at step 2 (a real out-of-memory on the CPU)
}


def run(config: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    cfg = {**DEFAULTS, **config}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"synthetic trial: unknown keys {sorted(unknown)}")
    rng = random.Random(cfg["seed"])
    lr = float(cfg["lr"])
    # The best lr is 1e-3: speed falls off with the log-distance from it.
    speed = math.exp(-abs(math.log10(lr) - math.log10(1e-3)))
    jitter = random.Random(f"diverge-{cfg['seed']}").uniform(-1.0, 1.0)
    threshold = cfg["diverge_above"] * 10 ** (cfg["diverge_spread"] * jitter)
    diverges_at = 5 if lr > threshold else cfg["nan_from"]
    row: dict[str, Any] = {}
    for step in range(1, cfg["steps"] + 1):  # a step counts updates done
        if cfg["step_seconds"]:
            time.sleep(cfg["step_seconds"])
        if cfg["allocate_gb"] is not None and step == 2:
            import torch

            torch.empty(int(cfg["allocate_gb"] * 2**30), dtype=torch.uint8).fill_(1)
        loss = 0.1 + 1.0 / (1.0 + speed * step) + 0.01 * rng.random()
        if diverges_at is not None and step >= diverges_at:
            loss = float("nan")
        row = {"step": step, "train_loss": loss}
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            row["val_loss"] = loss
        if step == cfg["steps"]:
            row["outcome"] = Outcome.COMPLETED.value
        report(row)
    return row
