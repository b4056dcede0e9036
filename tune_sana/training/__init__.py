"""What one trial needs: precision policies, the flow-matching loss, the fixed validation, the
health checks and the guard around the optimizer step, damage without NaN (at load and by
collapse), diagnosis of the first non-finite module, models (Sana 1.0, 1.5 and Sprint) and LoRA,
fp32 linear attention, checkpoints, the optimizer, a trial's memory estimate, lr schedules,
batches and run statistics, and the demo base that the demo fine-tunes.

May import: config, outcomes, device, data, torch, diffusers, peft.
Never imports: Ray, engine, record, analysis. Trial programs (trials/) are built from it.
"""
