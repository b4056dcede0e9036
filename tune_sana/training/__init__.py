"""What one trial needs: precision policies, the flow-matching loss, the fixed validation, the
health checks and the guard around the optimizer step, diagnosis of the first non-finite module,
models and LoRA, fp32 linear attention, checkpoints, the optimizer, lr schedules, batches and
run statistics, and the demo base that the demo fine-tunes.

May import: config, outcomes, device, data, torch, diffusers, peft.
Never imports: Ray, engine, record, analysis. Trial programs (trials/) are built from it.
"""
