"""Every benchmark under bench/ runs end to end at a tiny size and prints one JSON object last.

The scripts run in this process (one shared local Ray, so the whole file stays near a minute on
two cores); their figures at tiny sizes mean nothing and are not checked, only their shape.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Each benchmark with arguments that make it tiny (the fresh tiny model: no demo base needed).
TINY: dict[str, list[str]] = {
    "trial_overhead": ["--model", "sana-tiny", "--steps", "4", "--rounds", "1",
                       "--precisions", "fp32"],
    "searcher_divergence": ["--trials", "4", "--seeds", "0", "--steps", "8", "--grace", "2",
                            "--concurrency", "1"],
    "search_efficiency": ["--trial", "demo", "--model", "sana-tiny", "--steps", "4",
                          "--eval-every", "2", "--grid-lrs", "1", "--optimum", "none",
                          "--trials", "1", "--seeds", "0", "--grace", "2", "--concurrency", "1"],
    "wasted_compute": ["--model", "sana-tiny", "--steps", "4", "--eval-every", "2",
                       "--grace", "2", "--precisions", "fp32,fp16", "--lrs", "1e-3",
                       "--concurrency", "1"],
    "orchestration": ["--model", "sana-tiny", "--trials", "2", "--steps", "4",
                      "--concurrency", "1"],
    "demo_finetune": ["--model", "sana-tiny", "--steps", "4", "--lrs", "1e-3,1e-2",
                      "--seeds", "0,1", "--draws-seeds", "3"],
    "rank_agreement": ["--model", "sana-tiny", "--rounds", "1", "--steps", "4",
                       "--skip-startup"],
    "warm_start": ["--seeds", "0", "--trials", "1", "--first-trials", "2",
                   "--concurrency", "1"],
    "ingest": ["--trials", "1", "--steps", "300", "--ray-steps", "5"],
    "thousand_trials": ["--trials", "3", "--steps", "2"],
    "cold_start": ["--model", "sana-tiny", "--rounds", "1", "--warmup", "0"],
}
FIELDS: dict[str, set[str]] = {
    "trial_overhead": {"worst_ratio", "worst_cpu_ratio", "modes", "target_met"},
    "searcher_divergence": {"stock", "tune_sana", "target_met"},
    "search_efficiency": {"trial", "best_val_loss", "threshold", "random_hit_probability",
                          "tune_sana_median_steps", "random_median_steps", "ratio",
                          "target_met"},
    "wasted_compute": {"plain_steps_after_onset", "tune_sana_steps_after_onset",
                       "plain_total_steps", "tune_sana_total_steps", "plain_wall_s",
                       "tune_sana_wall_s", "target_met"},
    "orchestration": {"tune_sana_efficiency", "plain_efficiency", "tune_sana", "plain",
                      "target_met"},
    "demo_finetune": {"base_val_loss", "improvement", "seed_spread", "separation",
                      "low_lr_share", "high_lr_forgets_or_diverges", "val_draws", "targets"},
    "rank_agreement": {"agreement", "target_met"},
    "warm_start": {"first_best_val_loss", "warm_median_steps", "cold_median_steps", "ratio",
                   "target_met"},
    "ingest": {"ours", "plain", "nothing_lost", "ours_rows_s", "plain_results_s", "target_met"},
    "thousand_trials": {"recorded", "memory_growth_mb", "finish_first_ms", "finish_last_ms",
                        "compacted", "target_met"},
    "cold_start": {"import_torch_s", "bare_first_step_s", "trial_first_step_s",
                   "excess_over_import_torch_s", "top_importers_s", "target_met"},
}


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def _run(name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module(name)
        module.main(TINY[name])
    finally:
        sys.path.remove(str(BENCH))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) >= 2, "a human summary, then the JSON line"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest.mark.parametrize("name", list(TINY))
def test_benchmark_prints_its_figures_as_json_last(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(name, capsys)
    assert result["benchmark"] == name
    assert FIELDS[name] <= set(result), FIELDS[name] - set(result)
    assert isinstance(result["target_met"], bool)
    assert result["machine"]["cpus"] >= 1


# bench/frontier.py (issue 13): the synthetic trial, two combos (one bracketed, one stable to the
# upper bound), a narrow lr range and a loose tolerance, so the search is ~10 short trials.
TINY["frontier"] = ["--diverge-above", "1e-3,10", "--steps", "6", "--lr-low", "1e-4",
                    "--lr-high", "1e-1", "--tolerance", "2", "--concurrency", "1"]
FIELDS["frontier"] = {"combos", "frontier_trial_steps", "grid_trial_steps", "cost_ratio",
                      "targets", "target_met"}


def test_frontier_benchmark_compares_the_search_with_its_grid(
        capsys: pytest.CaptureFixture[str]) -> None:
    result = _run("frontier", capsys)
    assert result["benchmark"] == "frontier"
    assert FIELDS["frontier"] <= set(result), FIELDS["frontier"] - set(result)
    assert isinstance(result["target_met"], bool)
    assert [e["label"] for e in result["combos"]] == ["diverge_above 0.001",
                                                      "diverge_above 10.0"]
    assert all(e["agreement"] in ("inside", "adjacent", "disagree", "unsettled")
               for e in result["combos"])
    assert result["frontier_trial_steps"] == result["frontier_parquet_steps"]


# bench/soak.py (issue 18): three trials, one worker killed a few seconds in; the full run is 30
# minutes (python bench/soak.py). Its two sweeps are CLI subprocesses with their own Ray.
TINY["soak"] = ["--samples", "3", "--kill-every", "6", "--max-kills", "1",
                "--step-seconds", "0.1"]
FIELDS["soak"] = {"faults_injected", "faults_survived", "rows_lost", "rows_doubled",
                  "duration_s", "identical", "target_met"}


def test_soak_benchmark_compares_its_record_with_the_unfaulted_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    result = _run("soak", capsys)
    assert FIELDS["soak"] <= set(result), FIELDS["soak"] - set(result)
    assert result["sweep_exit"] == 0 and result["reference_exit"] == 0
    assert result["identical"] and result["rows_lost"] == 0 and result["rows_doubled"] == 0, \
        {k: v for k, v in result.items() if k != "machine"}
    assert result["faults_survived"] <= result["faults_injected"]
