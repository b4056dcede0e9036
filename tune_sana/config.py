"""The trial configuration: every key a trial program reads, validated when it is built.

Keys are part of the public interface (search spaces, ``--set`` and the Parquet columns use
these names). Unknown keys are rejected with a did-you-mean, never ignored.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class UserError(Exception):
    """A problem with the user's input: printed as one line (exit status 2), never a traceback."""


class Precision(str, enum.Enum):
    """How weights are stored and how the forward/backward is computed (see precision.py)."""

    FP32 = "fp32"
    FP16_AMP = "fp16-amp"
    BF16_AMP = "bf16-amp"
    FP16 = "fp16"
    BF16 = "bf16"


class LrSchedule(str, enum.Enum):
    """Learning-rate shape after a linear warmup of ``warmup_steps``."""

    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class Finetune(str, enum.Enum):
    """Which weights a trial trains: all of the transformer, or a LoRA adapter on it."""

    FULL = "full"
    LORA = "lora"


class OnNonfinite(str, enum.Enum):
    """What a trial does on a non-finite loss or gradient: end at once, or skip up to K steps."""

    STOP = "stop"
    SKIP = "skip"


# Model names that are not checkpoint folders: the demo base (built once by ``tune-sana
# make-base`` under home()) and the freshly initialised tiny preset.
DEMO_BASE = "demo-base"
TINY = "sana-tiny"
PRESETS: tuple[str, ...] = (TINY,)


# An Adam-family update moves each weight by about lr per step: far beyond any lr that trains
# (a frontier search's brackets end near 1), short of where the arithmetic itself overflows.
LR_MAX = 1e3


def home() -> Path:
    """Where built artefacts (the demo base, encoding caches) live: $TUNE_SANA_HOME or
    ~/.cache/tune-sana."""
    return Path(os.environ.get("TUNE_SANA_HOME", Path.home() / ".cache" / "tune-sana"))


class TrialConfig(BaseModel):
    """One fine-tuning run of Sana. Every field is a searchable or fixed setting."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, frozen=True)

    model: str = Field(DEMO_BASE, description="preset name, hub id or diffusers folder")
    variant: Literal["fp16", "bf16"] | None = Field(
        None, description="checkpoint weight variant to load (diffusers variant=)"
    )
    data: str = Field("builtin:shapes", description="built-in dataset or encoded cache folder")
    steps: int = Field(200, ge=1, description="optimizer steps to run")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch (see grad_accum_steps)")
    seed: int = Field(0, ge=0, description="seeds init order, batches, noise and timesteps")
    lr: float = Field(1e-4, gt=0, le=LR_MAX, allow_inf_nan=False,
                      description="peak learning rate (after warmup)")
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr")
    max_grad_norm: float | None = Field(None, gt=0, description="clip total grad norm; null = off")
    optimizer: Literal["adamw", "came", "adamw8bit"] = Field(
        "adamw", description="adamw (torch), came (extra 'came'), adamw8bit (extra '8bit', CUDA)"
    )
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay (CAME's beta1)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="second-moment decay (CAME's beta2)")
    adam_eps: float = Field(1e-8, gt=0, description="adamw and adamw8bit: denominator eps")
    came_beta3: float = Field(0.9999, ge=0, lt=1, description="came: instability decay")
    came_eps1: float = Field(1e-30, gt=0, description="came: eps added to the squared gradient")
    came_eps2: float = Field(1e-16, gt=0, description="came: eps added to the instability")
    grad_accum_steps: int = Field(
        1, ge=1, description="micro-batches of batch_size per optimizer step (loss averaged)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward (less memory)"
    )
    precision: Precision = Precision.FP32
    attention_fp32: bool = Field(
        False, description="run the linear-attention matmuls in fp32 with autocast disabled"
    )
    finetune: Finetune = Field(
        Finetune.FULL, description="full: train every weight; lora: a peft LoRA adapter only"
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank r (finetune=lora)")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha: updates scale by alpha / rank; null = rank"
    )
    lora_targets: str = Field(
        "to_q,to_k,to_v", description="comma-separated module names LoRA wraps (finetune=lora)"
    )
    eval_every: int = Field(25, ge=1, description="validation loss every N steps (and at the end)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N steps (under Ray: a "
        "trial whose process dies is retried from it); null = never"
    )
    val_batch_size: int = Field(32, ge=1, description="held-out samples in the fixed val batch")
    val_draws: int = Field(
        4, ge=1, description="fixed draws of noise and timesteps the validation loss averages"
    )
    sample_steps: int = Field(
        10, ge=0, le=1000, description="Euler steps of the fixed sample grid a completed trial "
        "draws (and the base at step 0: training/sampling.py); 0 = no pictures"
    )
    on_nonfinite: OnNonfinite = OnNonfinite.STOP
    max_skips: int = Field(0, ge=0, description="non-finite steps skipped before diverging")
    loss_spike_factor: float | None = Field(
        10.0, gt=1, description="diverge when loss > factor x its running mean; null = off"
    )
    min_loss_scale: float = Field(
        1e-3, gt=0, description="fp16-amp: diverge when GradScaler's scale falls below this"
    )
    damage_tolerance: float | None = Field(
        0.05, ge=0, description="flag damaged_at_load when the step-0 val loss in this "
        "precision is worse than in the checkpoint's native one by more than this share; "
        "null = no load check"
    )
    collapse_factor: float | None = Field(
        2.0, gt=1, description="end the trial as collapsed when its (finite) val loss stays "
        "above factor x the base's for collapse_patience evaluations; null = off"
    )
    collapse_patience: int = Field(
        2, ge=1, description="evaluations in a row above collapse_factor x base to collapse"
    )
    logit_mean: float = Field(0.0, description="logit-normal timestep sampling: mean")
    logit_std: float = Field(1.0, gt=0, description="logit-normal timestep sampling: std")
    flow_shift: float = Field(1.0, gt=0, description="sigma -> shift*s / (1 + (shift-1)*s)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch default")

    @field_validator("adam_eps", "came_eps1", "came_eps2", "min_loss_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("lora_targets")
    @classmethod
    def _module_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        if not all(n and all(c.isalnum() or c in "_." for c in n) for n in names):
            raise ValueError("must be comma-separated module names, e.g. to_q,to_k,to_v")
        return ",".join(names)

    def as_row(self) -> dict[str, Any]:
        """Plain JSON/Parquet-friendly values (enums as their strings)."""
        return self.model_dump(mode="json")


TRIAL_KEYS: tuple[str, ...] = tuple(TrialConfig.model_fields)


def did_you_mean(key: str, choices: Any) -> str:
    """A ' (did you mean X?)' suffix for a misspelt key, or ''."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# YAML 1.1 (PyYAML) reads a float only with a dot: "1e-4" would stay the string '1e-4'.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as YAML (so 1e-4, true, null and [a, b] work)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def read_yaml_mapping(path: str | Path, what: str = "a mapping of key: value") -> dict[str, Any]:
    """A YAML file's top-level mapping, read with the safe loader; every problem is a UserError
    naming the file (and the line, for malformed YAML). An empty file is an empty mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; a YAML file is expected") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path}: malformed YAML{where}; fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected {what} at the top level")
    return loaded


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "precision=fp16-amp"]`` -> ``{"lr": 1e-4, "precision": "fp16-amp"}``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set lr=1e-4")
        out[key.strip()] = parse_value(value.strip())
    return out


def build_config(values: Mapping[str, Any], source: str = "config") -> TrialConfig:
    """Validate ``values`` into a TrialConfig; raise UserError naming the key on bad input."""
    for key in values:
        if key not in TrialConfig.model_fields:
            raise UserError(
                f"{source}: unknown key '{key}'{did_you_mean(key, TRIAL_KEYS)}; "
                f"valid keys: {', '.join(TRIAL_KEYS)}"
            )
    try:
        return TrialConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "?"
        given = values.get(str(first["loc"][0])) if first["loc"] else None
        raise UserError(f"{source}: key '{loc}' = {given!r}: {first['msg']}") from None
