"""Memory and batch tools: gradient accumulation (grad_accum_steps micro-batches of batch_size per
optimizer step), diffusers' gradient checkpointing, and the peak memory a trial reports with
what it measured (peak_memory_kind)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import fast_config, run_trial
from tests.test_training_syncs import _run_counting
from tests.test_trial import _assert_diverged
from tune_sana.device import CPU_PEAK_RSS, CUDA_MAX_ALLOCATED, peak_memory
from tune_sana.record.schema import file_metadata
from tune_sana.record.writer import trial_row, trials_table

Rows = list[dict[str, Any]]
NAN = float("nan")


def _parts(**overrides: Any) -> Any:
    from trials import sana_finetune

    return sana_finetune.setup(fast_config(**overrides))


def _grads(parts: Any) -> list[torch.Tensor]:
    return [p.grad.clone() for p in parts.params]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- gradient accumulation ------------------------------------------------------------------------

def test_two_micro_batches_of_4_make_the_first_update_of_one_batch_of_8() -> None:
    # Same data and noise: an optimizer step draws batch_size x grad_accum_steps samples at once.
    # Adam's first update is lr * g / (|g| + eps): eps 1e-6 keeps gradients that are 0 up to
    # rounding (cross-attention's key bias: softmax ignores a shift) from becoming +-lr noise.
    runs = []
    for overrides in ({"batch_size": 8}, {"batch_size": 4, "grad_accum_steps": 2}):
        before: dict[str, torch.Tensor] = {}
        models: list[nn.Module] = []

        def keep(model: nn.Module, before: dict[str, torch.Tensor] = before,
                 models: list[nn.Module] = models) -> None:
            before.update(_params(model))
            models.append(model)

        config = fast_config(steps=1, lr=1e-3, adam_eps=1e-6, **overrides)
        rows, summary = run_trial(config, on_model=keep)
        assert summary["outcome"] == "completed"
        after = _params(models[0])
        runs.append((rows[1], {name: after[name] - before[name] for name in after}))
    (row8, update8), (row44, update44) = runs
    assert row44["train_loss"] == pytest.approx(row8["train_loss"], rel=1e-6)
    assert row44["grad_norm"] == pytest.approx(row8["grad_norm"], rel=1e-5)
    assert max(float(u.abs().max()) for u in update8.values()) > 1e-4  # an update happened
    for name, update in update8.items():
        # each weight moves by about lr = 1e-3; they agree to 1% of that
        torch.testing.assert_close(update44[name], update, rtol=1e-3, atol=1e-5, msg=name)


def test_uneven_micro_batches_are_weighted_by_their_samples() -> None:
    # A batch of 8 in micro-batches of 3, 3 and 2: the accumulated gradient is the gradient of
    # the mean loss over all 8, not the mean of the three micro-batch means.
    whole, micro = _parts(batch_size=8), _parts(batch_size=3)
    batch = whole.next_batch()
    assert [len(b) for b in batch.split(3)] == [3, 3, 2]
    loss_whole, loss_micro = whole.backward(batch), micro.backward(batch)
    torch.testing.assert_close(loss_micro, loss_whole, rtol=1e-6, atol=0)
    for got, want in zip(_grads(micro), _grads(whole), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_health_is_checked_once_per_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 micro-batches per step add no host sync: the guard still reads twice per optimizer step;
    # neither does CAME's step.
    steps, forwards = 4, []

    def count_forwards(_rows: Rows) -> Any:
        def on_model(model: nn.Module) -> None:
            model.register_forward_pre_hook(
                lambda mod, _args: forwards.append(1) if mod.training else None)
        return on_model

    syncs = {}
    for accum, optimizer in ((1, "adamw"), (3, "adamw"), (3, "came")):
        forwards.clear()
        config = fast_config(steps=steps, eval_every=2, batch_size=2, grad_accum_steps=accum,
                             optimizer=optimizer)
        counter, rows, summary = _run_counting(monkeypatch, config, count_forwards)
        monkeypatch.undo()
        assert summary["outcome"] == "completed" and len(rows) == steps + 1
        assert len(forwards) == steps * accum
        syncs[accum, optimizer] = dict(counter.by_caller)
    assert syncs[3, "adamw"] == syncs[1, "adamw"] == syncs[3, "came"]
    assert syncs[3, "adamw"]["Guard.before_step"] == syncs[3, "adamw"]["Guard.after_step"] == steps


def _corrupt_micro_grad_at(rows: Rows, name: str, step: int, micro: int
                           ) -> Any:
    """NaN into ``name``'s gradient in the backward of micro-batch ``micro`` (0-based) of
    ``step`` only: the other micro-batches' gradients stay finite."""
    seen: list[int] = []

    def on_model(model: nn.Module) -> None:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if len(rows) != step:
                return grad
            seen.append(1)
            return torch.full_like(grad, NAN) if len(seen) == micro + 1 else grad

        model.get_parameter(name).register_hook(hook)

    return on_model


@pytest.mark.parametrize("optimizer", ["adamw", "came"])
def test_nan_in_one_micro_batch_is_caught_at_its_optimizer_step(optimizer: str) -> None:
    rows: Rows = []
    name = "transformer_blocks.0.attn1.to_v.weight"
    from trials import sana_finetune

    config = fast_config(steps=5, batch_size=4, grad_accum_steps=2, optimizer=optimizer)
    summary = sana_finetune.run(config, rows.append,
                                on_model=_corrupt_micro_grad_at(rows, name, step=3, micro=1))
    _assert_diverged(rows, summary, 3, "nonfinite_grad", "gradient", name)
    assert summary["train_loss"] is not None  # the losses stayed finite


def test_nan_forward_in_a_micro_batch_is_located_by_the_replay() -> None:
    rows: Rows = []
    module = "transformer_blocks.1.attn1.to_q"
    calls: list[int] = []

    def on_model(model: nn.Module) -> None:
        def pre_hook(mod: nn.Module, _args: object) -> None:
            if len(rows) == 2 and mod.training:
                calls.append(1)
                if len(calls) == 2:  # the second micro-batch of step 2
                    with torch.no_grad():
                        mod.weight[0, 0] = NAN

        model.get_submodule(module).register_forward_pre_hook(pre_hook)

    from trials import sana_finetune

    config = fast_config(steps=4, batch_size=4, grad_accum_steps=2)
    summary = sana_finetune.run(config, rows.append, on_model=on_model)
    _assert_diverged(rows, summary, 2, "nonfinite_loss", "forward", module)


# --- gradient checkpointing -----------------------------------------------------------------------

MODES = ["fp32", "fp16-amp", "bf16-amp", "fp16", "bf16"]


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("precision", MODES)
def test_checkpointing_gives_the_same_loss_and_gradients(precision: str, finetune: str) -> None:
    runs: list[int] = []
    results = []
    for checkpointing in (False, True):
        parts = _parts(precision=precision, finetune=finetune, attention_fp32=True,
                       gradient_checkpointing=checkpointing)
        block = parts.model.get_submodule("transformer_blocks.0")
        handle = block.register_forward_pre_hook(
            lambda *_, on=checkpointing: runs.append(on))
        parts.optimizer.zero_grad(set_to_none=True)
        loss = parts.backward(parts.next_batch())
        handle.remove()
        assert all(p.grad is not None for p in parts.params)
        results.append((loss, _grads(parts)))
    assert runs == [False, True, True]  # checkpointed: the block runs again in the backward
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert math.isfinite(float(loss))
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for got, want in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_came_with_accumulation_and_checkpointing_trains_lora() -> None:
    rows, summary = run_trial(fast_config(
        steps=3, optimizer="came", batch_size=4, grad_accum_steps=2, gradient_checkpointing=True,
        finetune="lora", precision="bf16-amp", lr=1e-3))
    assert summary["outcome"] == "completed" and summary["steps_run"] == 3
    assert summary["val_loss"] is not None


# --- peak memory ----------------------------------------------------------------------------------

def test_cpu_peak_memory_is_the_process_peak_rss_and_says_so() -> None:
    config = fast_config(steps=1)
    _rows, summary = run_trial(config)
    assert summary["peak_memory_kind"] == CPU_PEAK_RSS
    assert 10 < summary["peak_memory_mb"] < 1e6  # MiB of a Python process running torch
    table = trials_table([trial_row("t0", config.as_row(), summary)], file_metadata())
    assert table.column("peak_memory_kind").to_pylist() == [CPU_PEAK_RSS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peak_memory_is_torchs_max_allocated() -> None:
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB
    mb, kind = peak_memory(device)
    del block
    assert kind == CUDA_MAX_ALLOCATED and mb >= 64
