"""Cold start: how much later than ``import torch`` a fresh trial process reaches its first step.

    .venv/bin/python bench/cold_start.py [--rounds 5] [--model demo-base] [--warmup 1]

Three fresh Python processes per round, interleaved (A B C A B C ...), each timed from just
before it is spawned:
- ``import torch``: the issue's yardstick (``python -c "import torch"``);
- a bare PyTorch first step: import torch, a small MLP, one AdamW step. torch's own
  optimizer imports ``torch._dynamo`` in its first ``step()`` (torch/optim/optimizer.py,
  ``_use_grad_for_differentiable``), so any training process pays that, with or without
  diffusers;
- a tune-sana trial: what a trial worker runs once Ray hands it the trial (import
  trials/sana_finetune.py, build the config, run it; fp32, the demo base, the built-in data,
  sample grids off): the time its imports are done, its step-0 row (the base's validation),
  and its step-1 row (the first update).
Target (issue 17 item 1): the trial's first step at most 1 s after ``import torch``.

Then, once, ``python -X importtime`` of the trial module: the top importers, as self time
summed by top-level package.

The JSON object on the last line holds the medians, the excesses and the importers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, emit, ensure_model, load_now, machine, rounded, say  # noqa: E402

TARGET_EXCESS_S = 1.0

BARE_STEP = """
import torch
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(8, 64)).pow(2).mean().backward()
opt.step()
"""

TRIAL = """
import json, sys, time
marks = {}
from trials import sana_finetune
marks["imported"] = time.time()
from tune_sana.config import build_config
config = build_config(json.loads(sys.argv[1]), source="bench")

def report(row):
    step = row.get("step")
    if step == 0 and "step0" not in marks:
        marks["step0"] = time.time()
    if step is not None and step >= 1 and "step1" not in marks:
        marks["step1"] = time.time()

sana_finetune.run(config, report)
print(json.dumps(marks))
"""


def _python(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """A fresh ``python *args`` in the repository, to its exit: the wall time just before its
    spawn, and the finished process (stdout and stderr captured)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
    return started, done


def _spawn(code: str) -> float:
    """Seconds from just before the spawn of ``python -c code`` to its exit."""
    started, _ = _python("-c", code)
    return time.time() - started


def _trial(values: dict[str, Any]) -> dict[str, float]:
    started, done = _python("-c", TRIAL, json.dumps(values))
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {key: value - started for key, value in marks.items()}


def importers(top: int = 10) -> dict[str, float]:
    """Self import time (s) summed by top-level package, for the trial module."""
    _, done = _python("-X", "importtime", "-c", "import trials.sana_finetune")
    by_package: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        by_package[name.strip().split(".")[0]] += int(self_us) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds, 3) for name, seconds in ranked}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="demo-base")
    parser.add_argument("--warmup", type=int, default=1, help="dropped trial runs first")
    args = parser.parse_args(argv)
    started_load = load_now()
    ensure_model(args.model)
    values = {"model": args.model, "data": "builtin:shapes", "device": "cpu", "threads": 1,
              "precision": "fp32", "steps": 1, "eval_every": 1, "sample_steps": 0,
              "batch_size": 8, "lr": 1e-3}
    for _ in range(args.warmup):  # warm the OS file cache and the encoded data; dropped
        _trial(values)
    torch_s, step_s, trial = [], [], []
    for i in range(args.rounds):
        torch_s.append(_spawn("import torch"))
        step_s.append(_spawn(BARE_STEP))
        trial.append(_trial(values))
        say(f"round {i + 1}: import torch {torch_s[-1]:.2f} s, bare first step "
            f"{step_s[-1]:.2f} s, trial imports {trial[-1]['imported']:.2f} s, step 0 "
            f"{trial[-1]['step0']:.2f} s, step 1 {trial[-1]['step1']:.2f} s")
    med = {key: statistics.median(t[key] for t in trial) for key in ("imported", "step0", "step1")}
    torch_med, step_med = statistics.median(torch_s), statistics.median(step_s)
    top = importers()
    say(f"medians: import torch {torch_med:.2f} s; bare first step {step_med:.2f} s; trial: "
        f"imports {med['imported']:.2f} s, step 0 {med['step0']:.2f} s, step 1 "
        f"{med['step1']:.2f} s")
    say(f"first step after import torch: +{med['step1'] - torch_med:.2f} s (target "
        f"<= {TARGET_EXCESS_S} s); after the bare first step: +{med['step1'] - step_med:.2f} s")
    say("top importers (self time by package): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in top.items()))
    emit({"benchmark": "cold_start", "rounds": args.rounds, "model": args.model,
          "import_torch_s": rounded(torch_med, 3), "bare_first_step_s": rounded(step_med, 3),
          "trial_imported_s": rounded(med["imported"], 3),
          "trial_step0_s": rounded(med["step0"], 3),
          "trial_first_step_s": rounded(med["step1"], 3),
          "excess_over_import_torch_s": rounded(med["step1"] - torch_med, 3),
          "excess_over_bare_step_s": rounded(med["step1"] - step_med, 3),
          "import_excess_s": rounded(med["imported"] - torch_med, 3),
          "target_excess_s": TARGET_EXCESS_S,
          "target_met": med["step1"] - torch_med <= TARGET_EXCESS_S,
          "top_importers_s": top, "machine": machine(started_load)})


if __name__ == "__main__":
    main()
