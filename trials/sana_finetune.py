"""One fine-tuning run of Sana's transformer with the flow-matching objective.

    tune-sana trial --set precision=fp16-amp --set lr=1e-3

Takes a validated TrialConfig and a ``report(row)`` callable; never imports Ray. ``setup`` builds
the parts (model, data, optimizer, checks), ``train`` runs the loop over them; ``run`` is both.

A step counts optimizer updates; each takes ``grad_accum_steps`` micro-batches of ``batch_size``
(their gradients accumulate, the loss is their mean). Step 0 is the untouched base: its row holds
the validation and retain losses before any update, so every trial knows its starting point.
Steps 1..N each report plain floats (or None): step, train_loss, grad_norm (before clipping), lr,
loss_scale, skipped, step_time_s, val_loss and retain_loss (on evaluation steps). Health is
checked on the accumulated gradient before and after each optimizer step, with one host sync
each; the step a trial diverges is its last, and its row says why and where.

Several workers (training/ranks.py): the runtime initialises torch.distributed and passes
``ranks``; every rank runs this same loop on its shard of each global batch, the pre-step check
is agreed across ranks once per step, and every rank stops at the same step with the same cause.
With one worker ``ranks`` is the default and nothing changes.

Pictures (training/sampling.py): step 0's row carries the base's fixed sample grid and a
completed trial's summary its own (base64 PNG; ``sample_steps`` 0: none); the driver writes
them under <run dir>/samples/ and the HTML report shows them.

Damage without NaN (training/damage.py): step 0 also evaluates the base in the checkpoint's
native precision when the trial computes in another dtype (``damaged_at_load``: a flag), and a
val loss that stays above collapse_factor x the base ends the trial as ``collapsed``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tune_sana.config import TrialConfig, UserError
from tune_sana.data.encoded import DataSplit, Encoded, load_data
from tune_sana.device import pick_device, reset_peak_memory
from tune_sana.outcomes import BASE_SAMPLES_KEY, SAMPLES_KEY, Cause, Outcome, clean
from tune_sana.training import damage
from tune_sana.training import precision as prec
from tune_sana.training.attention import use_fp32_linear_attention
from tune_sana.training.checkpoint import Checkpointer, TrainState
from tune_sana.training.flow import FlowBatch, flow_loss, make_batch
from tune_sana.training.guard import Guard, grad_norm, param_norm
from tune_sana.training.health import Verdict
from tune_sana.training.lora import apply_finetune
from tune_sana.training.models import load_transformer
from tune_sana.training.optimizer import check_available, make_optimizer
from tune_sana.training.ranks import FSDP_CAME, Ranks
from tune_sana.training.runtime import Batches, RunStats
from tune_sana.training.sampling import SampleGrid
from tune_sana.training.schedule import lr_scheduler
from tune_sana.training.validation import FixedValidation

Report = Callable[[dict[str, Any]], None]


@dataclass
class Parts:
    """What ``setup`` builds and ``train`` runs. Benchmarks run their own loops over it."""

    config: TrialConfig
    device: torch.device
    policy: prec.PrecisionPolicy
    data: DataSplit
    model: nn.Module  # what the training forward runs: net, or DDP over it (ranks.wrap)
    net: nn.Module  # the model itself: precision and attention applied, in train mode
    ranks: Ranks
    params: list[nn.Parameter]  # the trainable ones (FSDP: shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # a pass-through except under fp16-amp
    guard: Guard
    validate: FixedValidation  # held-out fine-tune data: the metric
    retain: FixedValidation | None  # held-out pretraining data: forgetting (None: no such set)
    batches: Batches
    noise_gen: torch.Generator
    stats: RunStats
    samples: SampleGrid  # the fixed picture grid (sample_steps 0: none)

    @property
    def state(self) -> TrainState:
        """What a checkpoint holds: enough to go on exactly where the trial was."""
        return TrainState(self.net, self.optimizer, self.scheduler, self.scaler, self.batches,
                          self.noise_gen, self.guard, self.stats, self.ranks)

    def next_batch(self) -> FlowBatch:
        """This rank's share (batch_size x grad_accum_steps samples) of one optimizer step's
        global batch, with its noise and timesteps, on the device. Every rank draws the whole
        global batch from the same generators, so the shards never overlap."""
        cfg = self.config
        batch = make_batch(self.batches.next(), self.noise_gen, cfg.logit_mean, cfg.logit_std,
                           cfg.flow_shift)
        return batch.slice(*self.ranks.shard_bounds(len(batch))).to(self.device)

    def loss(self, batch: FlowBatch) -> torch.Tensor:
        """The flow loss of ``batch`` under the precision policy (fp32, 0-dim; NaN stays NaN)."""
        with prec.autocast(self.policy, self.device):
            return flow_loss(self.model, batch, self.policy.weight_dtype)

    def backward(self, batch: FlowBatch) -> torch.Tensor:
        """Forward and backward over ``batch`` in micro-batches of ``batch_size``, accumulating
        the gradient of their mean loss (each weighted by its share of the samples). Returns that
        mean loss (fp32, 0-dim, on the device: no host sync; NaN if any micro-batch's is)."""
        loss = torch.zeros((), device=self.device)
        micros = batch.split(self.config.batch_size)
        for i, micro in enumerate(micros):
            last = i == len(micros) - 1
            with self.ranks.no_sync(self.model, last=last):
                part = self.loss(micro) * (len(micro) / len(batch))
                loss = loss + part.detach()
                if last:  # several workers: the loss rides the gradients' all-reduce
                    self.ranks.send_with_gradients(loss)
                self.scaler.scale(part).backward()
        return loss

    def losses(self, batch: FlowBatch) -> list[torch.Tensor]:
        """Each micro-batch's loss, no backward: the replay that locates a step's non-finite."""
        with prec.autocast(self.policy, self.device):  # the model itself: no DDP hooks
            return [flow_loss(self.net, micro, self.policy.weight_dtype)
                    for micro in batch.split(self.config.batch_size)]

    def validation(self) -> float:
        """The fixed-seed validation loss (NaN when the model's output is not finite)."""
        return self.validate(self.net, self.policy.weight_dtype,
                             prec.autocast(self.policy, self.device))

    def native_validation(self) -> float:
        """The fixed-seed validation loss of the checkpoint in its native precision
        (damage.native_policy): a second copy, loaded in its variant's dtype and run under that
        dtype's autocast with the linear attention in fp32 (as Sana trains: fp32_attention),
        then dropped. NaN when its output is not finite."""
        cfg, native = self.config, damage.native_policy(self.config.variant)
        with torch.random.fork_rng(devices=[]):  # a load that initialises weights draws
            model = load_transformer(cfg.model, variant=cfg.variant, dtype=native.weight_dtype,
                                     seed=cfg.seed).to(self.device)
        use_fp32_linear_attention(model)
        return self.validate(model, native.weight_dtype, prec.autocast(native, self.device))

    def retention(self) -> float | None:
        """The fixed-seed retain loss, or None when the data has no retain set."""
        if self.retain is None:
            return None
        return self.retain(self.net, self.policy.weight_dtype,
                           prec.autocast(self.policy, self.device))

    def evaluate(self, row: dict[str, Any]) -> Callable[[], object] | None:
        """Put val_loss and retain_loss into ``row``. Returns None when both are finite, else
        the replay of the evaluation that went non-finite (for locating it)."""
        row["val_loss"] = clean(self.validation())
        if row["val_loss"] is None:
            return functools.partial(self.replay_one, self.validate.batch)
        if self.retain is not None:
            row["retain_loss"] = clean(self.retention())
            if row["retain_loss"] is None:
                return functools.partial(self.replay_one, self.retain.batch)
        return None

    def sample_grid(self) -> str | None:
        """The fixed sample grid of the model as it is now (a base64 PNG), or None when
        sample_steps is 0 or the data has no decoder (training/sampling.py)."""
        return self.samples.grid(self.net, self.policy.weight_dtype,
                                 prec.autocast(self.policy, self.device))

    def replay_one(self, batch: FlowBatch) -> torch.Tensor:
        """The loss of ``batch`` through the model itself (a replay: no DDP hooks)."""
        with prec.autocast(self.policy, self.device):
            return flow_loss(self.net, batch, self.policy.weight_dtype)


def run(config: TrialConfig, report: Report,
        on_model: Callable[[nn.Module], None] | None = None,
        checkpoint: Checkpointer | None = None, ranks: Ranks | None = None) -> dict[str, Any]:
    """Train for ``config.steps`` steps or until divergence; returns the summary row.

    ``on_model`` is ``setup``'s seam; ``checkpoint`` is where ``train`` resumes from and saves to;
    ``ranks`` is this process's place among the trial's workers (default: the only one).
    """
    return train(setup(config, on_model, ranks), report, checkpoint)


def setup(config: TrialConfig,
          on_model: Callable[[nn.Module], None] | None = None,
          ranks: Ranks | None = None) -> Parts:
    """Build one trial's parts: device, precision policy, data, model, optimizer, checks.

    ``on_model``, if given, is called once with the ready model (precision and attention applied,
    in train mode) before anything else is built: a seam for tests and diagnostics to register
    hooks, e.g. one that corrupts a weight at a chosen step, and for benchmarks to start a clock.
    Engines never pass it. UserError if the device cannot run the precision mode or the
    optimizer (a missing extra, adamw8bit off a GPU). ``ranks.device`` (set by a multi-worker
    runtime: this worker's GPU) takes the place of ``config.device``.
    """
    ranks = ranks or Ranks()
    device = pick_device(ranks.device or config.device)
    policy = prec.policy_for(config.precision)
    prec.check_supported(policy.mode, device)
    check_available(config.optimizer, device)
    if ranks.sharded and config.optimizer == "came":
        raise UserError(FSDP_CAME)
    reset_peak_memory(device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    data = load_data(config.data)
    model = load_transformer(config.model, variant=config.variant, dtype=policy.weight_dtype,
                             seed=config.seed).to(device)
    model = apply_finetune(model, config, policy.weight_dtype)  # full, or LoRA on a frozen base
    if config.attention_fp32:
        use_fp32_linear_attention(model)
    if config.gradient_checkpointing:  # diffusers': recompute each block in the backward
        model.enable_gradient_checkpointing()  # type: ignore[operator]
    model.train()
    if on_model is not None:
        on_model(model)
    net, model = model, ranks.wrap(model, device)  # fsdp shards net in place: wrap first
    params = [p for p in net.parameters() if p.requires_grad]

    optimizer = make_optimizer(params, config)
    scaler = prec.grad_scaler(policy, device, sharded=ranks.sharded)
    return Parts(
        config, device, policy, data, model, net, ranks, params, optimizer,
        scheduler=lr_scheduler(optimizer, config),
        scaler=scaler,
        guard=Guard(config, loss_scale=prec.scale_on_host(scaler)),  # no sync yet: a float
        validate=_fixed_validation(data.val, config, device),
        retain=_fixed_validation(data.retain, config, device) if data.retain is not None
        else None,
        batches=Batches(data.train, config.batch_size * config.grad_accum_steps * ranks.world,
                        seed=config.seed),
        noise_gen=torch.Generator().manual_seed(config.seed),
        stats=RunStats(config, policy, device, n_params=sum(p.numel() for p in params),
                       workers=ranks.world),
        samples=SampleGrid(data.val, data.meta, config.sample_steps, config.flow_shift, device),
    )


def train(parts: Parts, report: Report, checkpoint: Checkpointer | None = None) -> dict[str, Any]:
    """Evaluate the base (step 0), then run steps 1..N; or go on from ``checkpoint``'s latest
    save when there is one (its base already known).

    Reports every step's row but the last; the last step's row carries the summary, which is
    reported and returned. Two host syncs per step: the guard's, before and after the step.
    """
    p, config = parts, parts.config
    start = _resume(p, checkpoint)
    if start == 0:
        row = _base_row(p)
        replay = p.evaluate(row)
        if replay is not None:  # the base itself gives a non-finite loss in this precision
            return _diverged(p, report, 0, Cause.NONFINITE_METRIC, row, replay)
        p.stats.record_base(row)
        _check_load(p, row["val_loss"])
        row[BASE_SAMPLES_KEY] = p.sample_grid()  # the driver keeps the first: base.png
        report(row)
        start = 1
    row = {}
    for step in range(start, config.steps + 1):
        started = time.perf_counter()
        lr = float(p.scheduler.get_last_lr()[0])
        batch = p.next_batch()

        p.optimizer.zero_grad(set_to_none=True)
        loss = p.backward(batch)  # grad_accum_steps micro-batches: one accumulated gradient
        p.scaler.unscale_(p.optimizer)
        gnorm = grad_norm(p.params, config.max_grad_norm, p.ranks)

        # sync 1: loss and grad norm, agreed across ranks (one all-reduce with several workers)
        finding, loss_f, gnorm_f = p.guard.before_step(loss, gnorm, p.ranks.agree(loss))
        if finding.verdict is Verdict.DIVERGED:
            row = _row(step, loss_f, gnorm_f, lr, p.guard.loss_scale, True, started)
            return _diverged(p, report, step, finding.cause, row,
                             functools.partial(p.losses, batch))

        skipped = finding.verdict is Verdict.SKIP
        if not skipped:
            # Not scaler.step(): it reads GradScaler's inf flag with .item(), a second sync
            # before the step. Sync 1 already told the host: an inf/NaN gradient makes the grad
            # norm non-finite, which under fp16-amp is a SKIP, and a SKIP never steps.
            p.optimizer.step()
        p.scaler.update()  # fp16-amp: halves the scale if unscale_ found inf/NaN (on the device)
        p.scheduler.step()

        pnorm, scale = param_norm(p.params, p.ranks), prec.scale_on_device(p.scaler)
        finding, backed_off = p.guard.after_step(pnorm, scale)  # sync 2: both together
        skipped = skipped or backed_off
        row = _row(step, loss_f, gnorm_f, lr, p.guard.loss_scale, skipped, started)
        if finding.verdict is Verdict.DIVERGED:
            return _diverged(p, report, step, finding.cause, row, lambda: None)

        if _due(step, config.eval_every) or step == config.steps:
            replay = p.evaluate(row)
            if replay is not None:
                return _diverged(p, report, step, Cause.NONFINITE_METRIC, row, replay)
            if p.guard.collapse.update(row["val_loss"]):
                return _collapsed(p, report, step, row, skipped)
        p.stats.record(row, skipped)
        if step < config.steps:
            if checkpoint is not None and _due(step, config.checkpoint_every):
                checkpoint.save(functools.partial(p.state.write, next_step=step + 1))
            report(row)

    return p.stats.finish(report, config.steps, Outcome.COMPLETED,
                          {SAMPLES_KEY: p.sample_grid()}, row=row)


def _resume(parts: Parts, checkpoint: Checkpointer | None) -> int:
    """The step to start from: 0 (the base first), or where a retried trial's latest checkpoint
    left off."""
    saved = checkpoint.restore() if checkpoint is not None else None
    if saved is None:
        return 0
    start = parts.state.read(saved)
    parts.guard.loss_scale = prec.scale_on_host(parts.scaler)  # the restored scaler's scale
    return start


def _diverged(parts: Parts, report: Report, step: int, cause: Cause | None,
              row: dict[str, Any], replay: Callable[[], object]) -> dict[str, Any]:
    """Report the diverged step's row with where it was first seen (and, with several
    workers, by which rank); the trial ends here."""
    assert cause is not None, "a DIVERGED finding always names its cause"
    where = parts.guard.locate_across(parts.ranks, step, cause, parts.net, replay)
    return parts.stats.finish(report, step, Outcome.DIVERGED, where.row(), row=row)


def _check_load(parts: Parts, base: float) -> None:
    """Step 0: the collapse watch's base, and the load check (damage.py): the base in the
    checkpoint's native precision, evaluated only when the trial computes in another dtype."""
    parts.guard.collapse.base = base
    tolerance = parts.config.damage_tolerance
    if tolerance is None:
        return
    native: float | None = base
    if damage.needs_native_check(parts.policy, parts.config.variant):
        native = clean(parts.native_validation())
    parts.stats.load_check = {"damaged_at_load": damage.damaged(base, native, tolerance),
                              "native_base_val_loss": native}


def _collapsed(parts: Parts, report: Report, step: int, row: dict[str, Any],
               skipped: bool) -> dict[str, Any]:
    """The val loss stayed above collapse_factor x base: finite, so it counts as the final
    one; the trial ends here."""
    parts.stats.record(row, skipped)
    extra = {"divergence_cause": Cause.LOSS_COLLAPSE.value, "diverged_step": step}
    return parts.stats.finish(report, step, Outcome.COLLAPSED, extra, row=row)


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def _fixed_validation(data: Encoded, config: TrialConfig, device: torch.device
                      ) -> FixedValidation:
    return FixedValidation(data, config.val_batch_size, config.logit_mean, config.logit_std,
                           config.flow_shift, device, draws=config.val_draws)


def _base_row(parts: Parts) -> dict[str, Any]:
    """Step 0's row: the base before any update (no training loss: no batch was trained on)."""
    return _row(0, None, None, float(parts.scheduler.get_last_lr()[0]), parts.guard.loss_scale,
                False, time.perf_counter())


def _row(step: int, loss: float | None, gnorm: float | None, lr: float, loss_scale: float | None,
         skipped: bool, started: float) -> dict[str, Any]:
    return {
        "step": step,
        "train_loss": clean(loss),
        "grad_norm": clean(gnorm),
        "lr": float(lr),
        "loss_scale": clean(loss_scale),
        "skipped": bool(skipped),
        "step_time_s": time.perf_counter() - started,
        "val_loss": None,
        "retain_loss": None,
    }
