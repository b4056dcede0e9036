"""What multi-worker trials cost: rank agreement per step, and the start-up of a 2-worker trial.

    python bench/rank_agreement.py [--rounds 5] [--steps 40]

1. Agreement. The demo trial (tiny demo base, builtin data, fp32) on 2 gloo workers, with the
   pre-step check agreed across ranks (one all-reduce per step: what tune-sana runs) and without
   (each rank checks only its own loss: the baseline). The same two processes run every trial,
   alternating ours and the baseline (A B B A ...) after a dropped warm-up run; each trial's
   figure is the median step time of rank 0 (steps 1..N, evaluation steps excluded); the result
   is the median of the paired ratios, with their spread. Target: <= 1.02.
2. Start-up. One-trial sweeps through tune-sana's engine on the embedded Ray, once with
   ``resources.workers: 1`` and once with 2 (a Ray Train TorchTrainer inside the Tune trial):
   seconds from the sweep's start to the trial's step-0 row, and the difference.

The JSON object on the last line holds both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_now, machine, rounded, run_tune_sana, say, workdir  # noqa: E402

TRIAL: dict[str, Any] = {"model": "demo-base", "data": "builtin:shapes", "batch_size": 4,
                         "val_batch_size": 16, "device": "cpu", "threads": 1,
                         "precision": "fp32", "lr": 1e-3}


def _median_step(rows: list[dict[str, Any]]) -> float:
    times = [r["step_time_s"] for r in rows
             if r.get("step", 0) > 0 and r.get("val_loss") is None and r.get("step_time_s")]
    return statistics.median(times)


def agreement(rounds: int, steps: int) -> dict[str, Any]:
    from tune_sana.testing.process_group import run_ranks

    values = {**TRIAL, "steps": steps, "eval_every": steps}
    # One pair of processes runs every trial, alternating ours and the baseline (ABBA...), after
    # one warm-up run that is dropped: no process start or first-run cost enters either side.
    order = [True] + [(i % 4) in (0, 3) for i in range(2 * rounds)]
    runs = run_ranks(values, world=2, agree=order)[0][1:]
    ours = [_median_step(rows) for rows, agree in zip(runs, order[1:], strict=True) if agree]
    base = [_median_step(rows) for rows, agree in zip(runs, order[1:], strict=True) if not agree]
    ratios = [a / b for a, b in zip(ours, base, strict=True)]
    for i, (a, b) in enumerate(zip(ours, base, strict=True)):
        say(f"pair {i + 1}: agreed {a * 1e3:.2f} ms/step, unagreed {b * 1e3:.2f} ms/step, "
            f"ratio {a / b:.4f}")
    return {"pairs": rounds, "steps": steps,
            "agreed_step_ms": rounded(statistics.median(ours) * 1e3, 3),
            "unagreed_step_ms": rounded(statistics.median(base) * 1e3, 3),
            "ratio_median": rounded(statistics.median(ratios)),
            "ratio_min": rounded(min(ratios)), "ratio_max": rounded(max(ratios)),
            "target": 1.02, "met": statistics.median(ratios) <= 1.02}


def startup(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workers in (1, 2):
        spec = {"trial": "sana_finetune", "metric": "val_loss",
                "search": {"algorithm": "random", "num_samples": 1, "seed": 0},
                "scheduler": {"type": "fifo"},
                "resources": {"workers": workers, "cpu": 1 if workers == 1 else 0.5},
                "fixed": {**TRIAL, "steps": 5, "eval_every": 5},
                "space": {"warmup_steps": {"choice": [0]}}}
        started = time.time()
        run = run_tune_sana(spec, folder, f"workers{workers}")
        first = min(r["timestamp"] for r in run.history)
        out[f"workers_{workers}_first_step_s"] = rounded(first - started, 2)
        say(f"{workers} worker(s): step 0 after {first - started:.1f} s "
            f"(sweep {run.wall_s:.1f} s)")
    out["extra_s"] = rounded(out["workers_2_first_step_s"] - out["workers_1_first_step_s"], 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="pairs of runs")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--out", help="keep the sweeps' run folders here")
    parser.add_argument("--model", default=TRIAL["model"])
    args = parser.parse_args(argv)
    TRIAL["model"] = args.model
    load = load_now()
    result: dict[str, Any] = {"benchmark": "rank_agreement",
                              "agreement": agreement(args.rounds, args.steps)}
    if not args.skip_startup:
        with workdir(args.out, "tune-sana-bench-workers-") as folder:
            result["startup"] = startup(folder)
    result["target_met"] = result["agreement"]["met"]
    result["machine"] = machine(load)
    emit(result)


if __name__ == "__main__":
    main()
