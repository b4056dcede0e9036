"""trials/sana_finetune.py run in-process with a list-append report, on the tiny model.

Forced non-finites use the trial's ``on_model`` seam (hooks on the real model) or torch's global
optimizer step hook: the trial's own checks must catch them at exactly the step they happen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests.conftest import assert_plain, fast_config, run_trial
from tune_sana.data.encoded import load_data
from tune_sana.training.checkpoint import LocalCheckpointer
from tune_sana.training.models import tiny_model
from tune_sana.training.validation import FixedValidation

Rows = list[dict[str, Any]]
NAN = float("nan")


def _val_losses(rows: Rows) -> list[float]:
    return [row["val_loss"] for row in rows if row["val_loss"] is not None]


def _assert_completed(rows: Rows, summary: dict[str, Any], steps: int) -> None:
    assert_plain(rows)
    assert rows[-1] is summary and summary["outcome"] == "completed"
    assert [row["step"] for row in rows] == list(range(steps + 1))  # step 0: the base
    assert summary["steps_run"] == steps and summary["diverged_step"] is None
    assert all("outcome" not in row for row in rows[:-1])


def _assert_diverged(rows: Rows, summary: dict[str, Any], step: int, cause: str, at: str,
                     module: str | None) -> None:
    """The divergence contract: one final row saying why and where, and no step after it."""
    assert_plain(rows)
    assert rows[-1] is summary
    assert [row["step"] for row in rows] == list(range(step + 1))
    assert all("outcome" not in row for row in rows[:-1])
    assert (summary["outcome"], summary["divergence_cause"], summary["nonfinite_at"]) == (
        "diverged", cause, at)
    assert summary["diverged_step"] == summary["step"] == step
    assert summary["nonfinite_module"] == module
    assert summary["steps_run"] == step


def _base_val_loss(size: int, draws: int) -> float:
    data = load_data("builtin:shapes")
    validate = FixedValidation(data.val, size, 0.0, 1.0, 1.0, torch.device("cpu"), draws=draws)
    return validate(tiny_model(seed=0), torch.float32)


@pytest.mark.parametrize("precision", ["fp32", "bf16-amp"])
def test_short_run_reduces_validation_loss(precision: str) -> None:
    config = fast_config(precision=precision, lr=3e-3, steps=30, eval_every=10)
    rows, summary = run_trial(config)
    _assert_completed(rows, summary, 30)
    vals = _val_losses(rows)
    assert len(vals) == 4 and vals == sorted(vals, reverse=True)  # the base, then steps 10-30
    assert summary["final_val_loss"] == summary["best_val_loss"] == vals[-1]
    base = _base_val_loss(config.val_batch_size, config.val_draws)
    # bf16 autocast rounds the base's forward a little differently from fp32
    assert rows[0]["val_loss"] == summary["base_val_loss"] == pytest.approx(base, rel=2e-3)
    assert rows[0]["train_loss"] is None and rows[0]["grad_norm"] is None
    assert summary["improvement"] == pytest.approx(1 - vals[-1] / summary["base_val_loss"])
    assert vals[-1] < 0.7 * base
    assert all(row["lr"] == 3e-3 and row["loss_scale"] is None for row in rows)


def test_retain_loss_is_recorded_from_the_base_on() -> None:
    rows, summary = run_trial(fast_config(lr=3e-3, steps=4, eval_every=2))
    retained = [row["retain_loss"] for row in rows]
    assert retained[0] is not None and retained[1] is None and retained[2] is not None
    assert summary["base_retain_loss"] == retained[0]
    assert summary["final_retain_loss"] == retained[-1] is not None


def test_more_validation_draws_average_more_noise() -> None:
    # The same model, the same samples: each set of draws is fixed, and K draws average K.
    data, model = load_data("builtin:shapes"), tiny_model(seed=0)
    cpu = torch.device("cpu")

    def val(draws: int, seed: int) -> float:
        return FixedValidation(data.val, 16, 0.0, 1.0, 1.0, cpu, draws=draws,
                               seed=seed)(model, torch.float32)

    assert val(4, 1) == val(4, 1)
    one = torch.tensor([val(1, seed) for seed in range(12)])
    four = torch.tensor([val(4, seed) for seed in range(12)])
    assert float(four.std()) < 0.8 * float(one.std())


def test_a_base_that_is_not_finite_diverges_at_step_zero() -> None:
    rows: Rows = []
    name = "transformer_blocks.0.ff.conv_inverted"
    from trials import sana_finetune

    summary = sana_finetune.run(fast_config(steps=4), rows.append,
                                on_model=_corrupt_forward_at(rows, name, 0, training=False))
    _assert_diverged(rows, summary, 0, "nonfinite_metric", "forward", name)


def test_pure_fp16_adamw_diverges_on_its_first_update() -> None:
    # AdamW's eps 1e-8 is 0 in fp16: 0/0 on the first update (reference/sana.md). The base
    # (step 0) evaluates fine; step 1 breaks the weights.
    rows, summary = run_trial(fast_config(precision="fp16", steps=5))
    _assert_diverged(rows, summary, 1, "nonfinite_params", "parameters", "scale_shift_table")
    assert rows[0]["val_loss"] is not None
    assert summary["train_loss"] is not None  # the forward was fine; the update broke the weights


def test_fp16_amp_runs_with_a_loss_scale() -> None:
    rows, summary = run_trial(fast_config(precision="fp16-amp", steps=3, attention_fp32=True))
    _assert_completed(rows, summary, 3)
    assert [row["loss_scale"] for row in rows] == [65536.0] * 4
    assert summary["final_val_loss"] is not None and summary["skipped_steps"] == 0


def test_fp16_autocast_linear_attention_goes_nan_in_attn1_and_fp32_attention_cures_it() -> None:
    # The seed's failure: under fp16 autocast the linear attention's matmuls run in fp16, so a
    # query whose ReLU features are all zero divides 0 by 0 (the +1e-15 rounds to 0). The fresh
    # tiny model's 16-wide heads hit it on the base's evaluation already; attention_fp32 runs the
    # same math in fp32 (the paired test above completes).
    rows, summary = run_trial(fast_config(precision="fp16-amp", steps=3))
    _assert_diverged(rows, summary, 0, "nonfinite_metric", "forward",
                     "transformer_blocks.0.attn1")


def test_pure_bf16_runs() -> None:
    rows, summary = run_trial(fast_config(precision="bf16", steps=3))
    _assert_completed(rows, summary, 3)
    assert summary["final_val_loss"] is not None


@pytest.mark.parametrize(("precision", "variant", "pairing"),
                         [("bf16-amp", "bf16", "native"), ("bf16", "fp16", "crossed")])
def test_checkpoint_variant_pairing_is_recorded(tiny_checkpoint: Path, precision: str,
                                                variant: str, pairing: str) -> None:
    rows, summary = run_trial(fast_config(model=str(tiny_checkpoint), variant=variant,
                                          precision=precision, steps=2))
    _assert_completed(rows, summary, 2)
    assert summary["pairing"] == pairing


def test_same_config_gives_identical_losses() -> None:
    config = fast_config(steps=12, eval_every=4, lr=1e-3)
    first, _ = run_trial(config)
    second, _ = run_trial(config)
    assert _val_losses(first) == _val_losses(second) and len(_val_losses(first)) == 4
    assert [r["train_loss"] for r in first] == [r["train_loss"] for r in second]
    other, _ = run_trial(fast_config(steps=12, eval_every=4, lr=1e-3, seed=1))
    assert _val_losses(other) != _val_losses(first)


# --- forced non-finites ---------------------------------------------------------------------

def _corrupt_forward_at(rows: Rows, name: str, step: int, training: bool = True
                        ) -> Callable[[nn.Module], None]:
    """Writes NaN into ``name``'s weight just before it runs in the forward of ``step``."""

    def on_model(model: nn.Module) -> None:
        module = model.get_submodule(name)

        def pre_hook(mod: nn.Module, _args: object) -> None:
            if len(rows) == step and mod.training is training:  # rows reported: base + step - 1
                with torch.no_grad():
                    mod.weight[0, 0] = NAN

        module.register_forward_pre_hook(pre_hook)

    return on_model


def _corrupt_grad_at(rows: Rows, name: str, steps: set[int], value: float = NAN
                     ) -> Callable[[nn.Module], None]:
    """Replaces ``name``'s gradient by ``value`` in the backward of each step in ``steps``."""

    def on_model(model: nn.Module) -> None:
        param = model.get_parameter(name)
        param.register_hook(lambda g: torch.full_like(g, value) if len(rows) in steps else g)

    return on_model


@contextmanager
def _after_optimizer_steps(hook: Callable[[], None]) -> Iterator[None]:
    handle = register_optimizer_step_post_hook(lambda *_: hook())
    try:
        yield
    finally:
        handle.remove()


def test_nan_weight_in_the_forward_is_caught_at_that_step_and_module() -> None:
    rows: Rows = []
    name = "transformer_blocks.1.attn1.to_v"
    from trials import sana_finetune

    summary = sana_finetune.run(fast_config(steps=8), rows.append,
                                on_model=_corrupt_forward_at(rows, name, step=3))
    _assert_diverged(rows, summary, 3, "nonfinite_loss", "forward", name)
    assert summary["train_loss"] is None and summary["max_abs_activation"] is not None


def test_nan_gradient_is_caught_at_that_step_and_named_despite_clipping() -> None:
    rows: Rows = []
    name = "transformer_blocks.1.attn1.to_k.weight"
    from trials import sana_finetune

    summary = sana_finetune.run(fast_config(steps=8, max_grad_norm=1.0), rows.append,
                                on_model=_corrupt_grad_at(rows, name, {2}))
    _assert_diverged(rows, summary, 2, "nonfinite_grad", "gradient", name)
    assert summary["train_loss"] is not None and summary["grad_norm"] is None


def test_nan_weight_after_the_update_is_caught_at_that_step() -> None:
    rows: Rows = []
    model: list[nn.Module] = []
    name = "proj_out.weight"

    def corrupt() -> None:
        if len(rows) == 4:
            with torch.no_grad():
                model[0].get_parameter(name)[0, 0] = math.inf

    from trials import sana_finetune

    with _after_optimizer_steps(corrupt):
        summary = sana_finetune.run(fast_config(steps=8), rows.append, on_model=model.append)
    _assert_diverged(rows, summary, 4, "nonfinite_params", "parameters", name)


def test_nan_validation_loss_diverges_with_nonfinite_metric() -> None:
    rows: Rows = []
    name = "transformer_blocks.0.ff.conv_inverted"
    from trials import sana_finetune

    summary = sana_finetune.run(fast_config(steps=8, eval_every=2), rows.append,
                                on_model=_corrupt_forward_at(rows, name, 2, training=False))
    _assert_diverged(rows, summary, 2, "nonfinite_metric", "forward", name)
    assert summary["val_loss"] is None and summary["train_loss"] is not None


def test_skip_policy_skips_k_steps_then_diverges() -> None:
    rows: Rows = []
    updates: list[int] = []
    name = "transformer_blocks.0.attn2.to_q.weight"
    config = fast_config(steps=8, on_nonfinite="skip", max_skips=2)
    from trials import sana_finetune

    with _after_optimizer_steps(lambda: updates.append(len(rows))):
        summary = sana_finetune.run(config, rows.append,
                                    on_model=_corrupt_grad_at(rows, name, {2, 3, 5}))
    _assert_diverged(rows, summary, 5, "nonfinite_grad", "gradient", name)
    assert [row["skipped"] for row in rows[:5]] == [False, False, True, True, False]
    assert updates == [1, 4]  # no optimizer step on a skipped step, none on the diverged one
    assert summary["skipped_steps"] == 2


def test_skipped_last_step_is_counted_once() -> None:
    rows: Rows = []
    config = fast_config(steps=3, on_nonfinite="skip", max_skips=1)
    from trials import sana_finetune

    summary = sana_finetune.run(config, rows.append,
                                on_model=_corrupt_grad_at(rows, "proj_out.weight", {3}))
    _assert_completed(rows, summary, 3)
    assert [row["skipped"] for row in rows] == [False, False, False, True]
    assert summary["skipped_steps"] == 1


def test_skip_with_zero_budget_diverges_at_once() -> None:
    rows: Rows = []
    from trials import sana_finetune

    summary = sana_finetune.run(fast_config(steps=4, on_nonfinite="skip"), rows.append,
                                on_model=_corrupt_grad_at(rows, "proj_out.weight", {1}))
    _assert_diverged(rows, summary, 1, "nonfinite_grad", "gradient", "proj_out.weight")


def test_fp16_amp_overflow_skips_then_loss_scale_collapses() -> None:
    # inf gradients every step: GradScaler skips each and halves its scale 65536 -> 32768 ->
    # 16384 -> 8192, below the floor of 1e4 at step 3.
    rows: Rows = []
    from trials import sana_finetune

    config = fast_config(precision="fp16-amp", attention_fp32=True, steps=6, min_loss_scale=1e4)
    summary = sana_finetune.run(config, rows.append,
                                on_model=_corrupt_grad_at(rows, "proj_out.weight",
                                                          set(range(1, 7)), math.inf))
    _assert_diverged(rows, summary, 3, "loss_scale_collapse", "loss_scale", None)
    assert [row["loss_scale"] for row in rows] == [65536.0, 32768.0, 16384.0, 8192.0]
    assert [row["skipped"] for row in rows[:3]] == [False, True, True]


# --- checkpoint and resume --------------------------------------------------------------------

class _Killed(Exception):
    pass


TIMING = {"step_time_s", "wall_time_s", "steps_per_s", "peak_memory_mb"}


def test_resumed_trial_goes_on_as_if_never_stopped(tmp_path: Path) -> None:
    # fp16-amp with an overflow at step 1 (skipped, scale halved): the checkpoint after step 4
    # must carry the scaler, the guard and the stats (the base's losses too), so that the
    # resumed steps 5-6 match an uninterrupted run's, loss scale and skip flags included.
    config = fast_config(precision="fp16-amp", attention_fp32=True, steps=6, eval_every=2,
                         checkpoint_every=2)
    from trials import sana_finetune

    def overflow_at_1(rows: Rows) -> Callable[[nn.Module], None]:
        return _corrupt_grad_at(rows, "proj_out.weight", {1}, math.inf)

    reference: Rows = []
    sana_finetune.run(config, reference.append, on_model=overflow_at_1(reference))

    rows: Rows = []

    def killed_at_5(row: dict[str, Any]) -> None:
        if row["step"] == 5:
            raise _Killed
        rows.append(row)

    checkpointer = LocalCheckpointer(tmp_path / "ckpt")
    with pytest.raises(_Killed):
        sana_finetune.run(config, killed_at_5, on_model=overflow_at_1(rows),
                          checkpoint=checkpointer)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    summary = sana_finetune.run(config, rows.append, on_model=overflow_at_1(rows),
                                checkpoint=checkpointer)
    _assert_completed(rows, summary, 6)
    assert [row["loss_scale"] for row in rows] == [65536.0] + [32768.0] * 6
    assert [row["skipped"] for row in rows] == [False, True] + [False] * 5
    assert summary["skipped_steps"] == 1
    assert summary["base_val_loss"] == reference[-1]["base_val_loss"] is not None
    for got, want in zip(rows, reference, strict=True):
        assert {k: v for k, v in got.items() if k not in TIMING} == {
            k: v for k, v in want.items() if k not in TIMING}
