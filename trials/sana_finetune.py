"""One fine-tuning run of Sana's transformer with the flow-matching objective.

    tune-sana trial --set precision=fp16-amp --set lr=1e-3

Takes a validated TrialConfig and a ``report(row)`` callable; never imports Ray. Every step it
reports plain floats (or None): step, train_loss, grad_norm (before clipping), lr, loss_scale,
skipped, step_time_s, val_loss (on evaluation steps). It checks health before and after each
optimizer step; the step a trial diverges is its last, and its row says why and where.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from tune_sana.config import TrialConfig
from tune_sana.data.encoded import load_data
from tune_sana.device import pick_device
from tune_sana.outcomes import Cause, Outcome, clean
from tune_sana.training import precision as prec
from tune_sana.training.attention import use_fp32_linear_attention
from tune_sana.training.checkpoint import Checkpointer, TrainState
from tune_sana.training.flow import flow_loss, make_batch
from tune_sana.training.guard import Guard, grad_norm, param_norm
from tune_sana.training.health import Verdict
from tune_sana.training.lora import apply_finetune
from tune_sana.training.models import load_transformer
from tune_sana.training.runtime import Batches, RunStats
from tune_sana.training.schedule import lr_factor
from tune_sana.training.validation import FixedValidation

Report = Callable[[dict[str, Any]], None]


def run(config: TrialConfig, report: Report,
        on_model: Callable[[torch.nn.Module], None] | None = None,
        checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """Train for ``config.steps`` steps or until divergence; returns the summary row.

    ``on_model``, if given, is called once with the ready model (precision and attention applied,
    in train mode) before the first step: a seam for tests and diagnostics to register hooks,
    e.g. one that corrupts a weight at a chosen step. Engines never pass it.
    """
    # --- setup -----------------------------------------------------------------------------
    device = pick_device(config.device)
    policy = prec.policy_for(config.precision)
    prec.check_supported(policy.mode, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    data = load_data(config.data)
    model = load_transformer(config.model, variant=config.variant, dtype=policy.weight_dtype,
                             seed=config.seed).to(device)
    model = apply_finetune(model, config, policy.weight_dtype)  # full, or LoRA on a frozen base
    if config.attention_fp32:
        use_fp32_linear_attention(model)
    model.train()
    if on_model is not None:
        on_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_schedule, config.warmup_steps, config.steps))
    scaler = prec.grad_scaler(policy, device)
    guard = Guard(config, scaler_enabled=scaler.is_enabled())
    validate = FixedValidation(data.val, config.val_batch_size, config.logit_mean,
                               config.logit_std, config.flow_shift, device)
    batches = Batches(data.train, config.batch_size, seed=config.seed)
    noise_gen = torch.Generator().manual_seed(config.seed)
    stats = RunStats(config, policy, device, n_params=sum(p.numel() for p in params))
    state = TrainState(model, optimizer, scheduler, scaler, batches, noise_gen, guard, stats)
    saved = checkpoint.restore() if checkpoint is not None else None
    start = state.read(saved) if saved is not None else 0  # a retried trial goes on from there

    # --- loop ------------------------------------------------------------------------------
    for step in range(start, config.steps):
        started = time.perf_counter()
        lr = float(scheduler.get_last_lr()[0])
        batch = make_batch(batches.next(), noise_gen, config.logit_mean, config.logit_std,
                           config.flow_shift).to(device)

        with prec.autocast(policy, device):
            loss = flow_loss(model, batch, policy.weight_dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        gnorm = grad_norm(params, config.max_grad_norm)

        finding, loss_f, gnorm_f = guard.before_step(loss, gnorm)
        if finding.verdict is Verdict.DIVERGED:
            assert finding.cause is not None
            where = guard.locate(step, finding.cause, model,
                                 functools.partial(_forward, model, batch, policy, device))
            return stats.finish(report, step, Outcome.DIVERGED, where.row(),
                                row=_row(step, loss_f, gnorm_f, lr, scaler, True, started))

        skipped = finding.verdict is Verdict.SKIP
        if scaler.is_enabled():
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # GradScaler skips the update itself when grads hold inf/NaN
            scaler.update()
            skipped = skipped or scaler.get_scale() < scale_before
        elif not skipped:
            optimizer.step()
        scheduler.step()

        finding = guard.after_step(param_norm(params), _scale(scaler))
        row = _row(step, loss_f, gnorm_f, lr, scaler, skipped, started)
        if finding.verdict is Verdict.DIVERGED:
            assert finding.cause is not None
            where = guard.locate(step, finding.cause, model, lambda: None)
            return stats.finish(report, step, Outcome.DIVERGED, where.row(), row=row)

        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            val = validate(model, policy.weight_dtype, prec.autocast(policy, device))
            row["val_loss"] = clean(val)
            if row["val_loss"] is None:
                where = guard.locate(step, Cause.NONFINITE_METRIC, model,
                                     functools.partial(_forward, model, validate.batch, policy,
                                                       device))
                return stats.finish(report, step, Outcome.DIVERGED, where.row(), row=row)
        stats.record(row, skipped)
        if step + 1 < config.steps:
            if checkpoint is not None and _due(step, config.checkpoint_every):
                checkpoint.save(functools.partial(state.write, next_step=step + 1))
            report(row)

    return stats.finish(report, config.steps - 1, Outcome.COMPLETED, {}, row=row)


def _due(step: int, every: int | None) -> bool:
    return every is not None and (step + 1) % every == 0


def _forward(model: torch.nn.Module, batch: Any, policy: prec.PrecisionPolicy,
             device: torch.device) -> object:
    with prec.autocast(policy, device):
        return flow_loss(model, batch, policy.weight_dtype)


def _scale(scaler: torch.amp.GradScaler) -> float:
    return float(scaler.get_scale()) if scaler.is_enabled() else 1.0


def _row(step: int, loss: float, gnorm: float, lr: float, scaler: torch.amp.GradScaler,
         skipped: bool, started: float) -> dict[str, Any]:
    return {
        "step": step,
        "train_loss": clean(loss),
        "grad_norm": clean(gnorm),
        "lr": float(lr),
        "loss_scale": clean(_scale(scaler)) if scaler.is_enabled() else None,
        "skipped": bool(skipped),
        "step_time_s": time.perf_counter() - started,
        "val_loss": None,
    }
