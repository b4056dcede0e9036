"""The pure divergence checks (three lines each) and the guard's tensor helpers."""

from __future__ import annotations

import math
import pickle

import torch
from torch import nn

from tune_sana.config import build_config
from tune_sana.outcomes import Cause, clean
from tune_sana.training import diagnose, guard, health
from tune_sana.training.health import Finding, Verdict

NAN, INF = math.nan, math.inf


def test_nan_loss_diverges_with_nonfinite_loss() -> None:
    assert health.pre_step(NAN, 1.0, scaler_handles_grads=False) == Finding(
        Verdict.DIVERGED, Cause.NONFINITE_LOSS)
    assert health.pre_step(INF, NAN, scaler_handles_grads=True).cause is Cause.NONFINITE_LOSS


def test_inf_grad_is_a_skip_under_fp16_amp_and_a_divergence_otherwise() -> None:
    assert health.pre_step(0.5, INF, scaler_handles_grads=True) == Finding(
        Verdict.SKIP, Cause.NONFINITE_GRAD)
    assert health.pre_step(0.5, NAN, scaler_handles_grads=False) == Finding(
        Verdict.DIVERGED, Cause.NONFINITE_GRAD)


def test_finite_step_is_ok() -> None:
    assert health.pre_step(0.5, 3.0, scaler_handles_grads=False).ok
    assert health.post_step(12.0).ok
    assert health.post_step(INF) == Finding(Verdict.DIVERGED, Cause.NONFINITE_PARAMS)


def test_loss_scale_floor() -> None:
    assert health.loss_scale(1.0, min_scale=1e-3).ok
    assert health.loss_scale(1e-4, min_scale=1e-3).cause is Cause.LOSS_SCALE_COLLAPSE


def test_spike_detector_fires_above_factor_times_level_after_warmup() -> None:
    spikes = health.SpikeDetector(factor=10.0, warmup=3)
    assert all(spikes.update(1.0).ok for _ in range(3))
    assert spikes.update(9.0).ok  # under 10x the level (1.0): not a spike, joins the level
    assert spikes.update(50.0) == Finding(Verdict.DIVERGED, Cause.LOSS_SPIKE)


def test_spike_detector_waits_for_warmup_and_can_be_off() -> None:
    early = health.SpikeDetector(factor=2.0, warmup=3)
    assert early.update(1.0).ok and early.update(100.0).ok  # still warming up
    off = health.SpikeDetector(factor=None, warmup=0)
    assert all(off.update(x).ok for x in (1.0, 1e9, 1e30))


def test_skip_budget_diverges_on_the_k_plus_first() -> None:
    budget = health.SkipBudget(max_skips=2)
    assert [budget.spend(Cause.NONFINITE_LOSS).verdict for _ in range(3)] == [
        Verdict.SKIP, Verdict.SKIP, Verdict.DIVERGED]
    assert health.SkipBudget(0).spend(Cause.NONFINITE_GRAD) == Finding(
        Verdict.DIVERGED, Cause.NONFINITE_GRAD)


def test_clean_turns_nonfinite_into_none() -> None:
    assert [clean(x) for x in (NAN, INF, -INF, None)] == [None, None, None, None]
    value = clean(torch.tensor(0.25).item())
    assert value == 0.25 and type(value) is float


def test_checks_pickle() -> None:
    spikes = health.SpikeDetector(factor=5.0)
    spikes.update(1.0)
    again = pickle.loads(pickle.dumps(spikes))
    assert again == spikes and pickle.loads(pickle.dumps(Cause.LOSS_SPIKE)) is Cause.LOSS_SPIKE


# --- the guard's tensor helpers ----------------------------------------------------------------

def _params(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = torch.tensor(grad)
    return params


def test_grad_norm_is_the_norm_before_clipping_and_clips() -> None:
    params = _params([3.0, 0.0], [4.0])
    assert float(guard.grad_norm(params, None)) == 5.0
    assert float(guard.grad_norm(params, 1.0)) == 5.0
    assert torch.allclose(torch.cat([p.grad for p in params]), torch.tensor([0.6, 0.0, 0.8]))


def test_nonfinite_grad_is_left_where_it_was_when_clipping() -> None:
    # Clipping by a NaN norm would spread NaN to every gradient and hide which one went bad.
    params = _params([3.0, 0.0], [NAN])
    assert math.isnan(float(guard.grad_norm(params, 1.0)))
    assert params[0].grad is not None and params[0].grad.tolist() == [3.0, 0.0]


def test_fp16_norms_do_not_overflow() -> None:
    # 1e5 weights of 300 are finite in fp16, but their norm (~94868) is above fp16's 65504.
    big = torch.nn.Parameter(torch.full((100_000,), 300.0, dtype=torch.float16))
    big.grad = big.detach().clone()
    assert math.isclose(float(guard.param_norm([big])), 300.0 * math.sqrt(1e5), rel_tol=1e-3)
    assert math.isfinite(float(guard.grad_norm([big], None)))
    assert guard.param_norm([big]).dtype == torch.float32


def test_guard_spends_the_skip_budget_then_diverges() -> None:
    config = build_config({"on_nonfinite": "skip", "max_skips": 1})
    g = guard.Guard(config, loss_scale=None)
    nan, one = torch.tensor(NAN), torch.tensor(1.0)
    assert g.before_step(nan, one)[0] == Finding(Verdict.SKIP, Cause.NONFINITE_LOSS)
    finding, loss, gnorm = g.before_step(one, nan)
    assert finding == Finding(Verdict.DIVERGED, Cause.NONFINITE_GRAD) and gnorm != gnorm
    assert loss == 1.0 and g.skipped_steps == 1


def test_guard_after_step_reads_norm_and_scale_together_and_sees_a_back_off() -> None:
    g = guard.Guard(build_config({"min_loss_scale": 1000.0}), loss_scale=4096.0)
    one = torch.tensor(1.0)
    assert g.after_step(one, torch.tensor(4096.0)) == (health.OK, False)
    assert g.after_step(one, torch.tensor(2048.0)) == (health.OK, True)  # halved: skipped
    assert g.loss_scale == 2048.0 and g.after_step(one, torch.tensor(4096.0))[1] is False
    assert g.after_step(one, torch.tensor(512.0)) == (
        Finding(Verdict.DIVERGED, Cause.LOSS_SCALE_COLLAPSE), True)
    assert g.after_step(torch.tensor(NAN), torch.tensor(512.0))[0].cause is Cause.NONFINITE_PARAMS
    no_scaler = guard.Guard(build_config({}), loss_scale=None)
    assert no_scaler.after_step(one, None) == (health.OK, False)


# --- where a divergence is first seen (diagnose) -----------------------------------------------

class _Divides(nn.Module):
    """Like Sana's attention: math between submodules, whose result feeds ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h / (h - h))  # 0/0 = NaN made here, not in a submodule


def test_replay_names_the_module_that_made_the_nan_not_the_one_carrying_it() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Divides(), nn.Linear(3, 3))
    found = diagnose.replay_forward(model, lambda: model(torch.ones(2, 3)))
    assert found.first_nonfinite_module == "1"  # not "1.out", whose input was already NaN
    assert found.max_abs_activation is not None and math.isfinite(found.max_abs_activation)


def test_replay_names_a_leaf_with_a_bad_weight_and_none_when_finite() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    assert diagnose.replay_forward(model, lambda: model(torch.ones(2, 3))).first_nonfinite_module \
        is None
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    found = diagnose.replay_forward(model, lambda: model(torch.ones(2, 3)))
    assert found.first_nonfinite_module == "2"
    assert diagnose.first_nonfinite_param(model) == "2.weight"
