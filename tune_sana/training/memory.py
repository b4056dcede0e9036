"""How much device memory one trial needs, estimated before it starts (preflight's fit check).

``estimate`` is a pure function of the trial's config, the transformer's config (its
config.json: no weights are loaded) and the data's shapes. It counts the bytes of the tensors a
trial keeps, comparable with ``torch.cuda.max_memory_allocated`` (a process also holds its CUDA
context and allocator slack, which preflight adds). What holds them:

- weights: every parameter in the policy's weight dtype (fp32 under fp32 and the amp modes,
  where they are the master weights; fp16/bf16 in pure fp16/bf16). LoRA: the frozen base in that
  dtype, the adapter in ``lora_dtype`` (fp32 over an fp16 base).
- amp copies: under fp16-amp/bf16-amp, autocast's 16-bit copy of each weight, cached during the
  forward and kept by autograd for the backward: 2 bytes a parameter.
- gradients: one per trainable parameter, in its dtype.
- optimizer state, per trainable parameter: adamw, two states (exp_avg, exp_avg_sq) in the
  parameter's dtype; came (came-pytorch), exp_avg plus, for a parameter of 2 or more dims, row
  and column factors of the second moment and of the instability over its last two dims (a
  1 x 1 conv weight's "row" is as large as the weight itself), else a full exp_avg_sq, all fp32
  (it upcasts 16-bit gradients); adamw8bit (bitsandbytes), two 1-byte states plus an fp32 absmax
  per 256-element block for parameters of 4,096+ elements, fp32 states for smaller ones.
- activations: what autograd saves for the backward of one micro-batch of ``batch_size``
  samples (``grad_accum_steps`` runs micro-batches one after another: it adds nothing), plus
  working memory for the backward of a block; ``gradient_checkpointing`` keeps each block's
  inputs only and recomputes one block at a time.
- evaluation: the fixed validation (and retain) draws held on the device, and the forward of
  one draw without autograd.
- load check: step 0's second copy of the model in the checkpoint's native dtype (the damage
  check), when the trial computes in another precision.
- step transients: torch's foreach AdamW (the CUDA default) makes one state-sized temporary;
  came makes a few temporaries the size of one parameter.

The peak is the resident part (weights, amp copies, evaluation data) plus the largest phase:
training, the optimizer step (gradients + state + its transients), evaluation (gradients +
state + one draw's forward), or the load check. Training is the state plus the larger of the
activations and the gradients beside the activations still alive when the backward reaches the
first block (the backward frees activations as it makes gradients, which are None before the
forward); with grad_accum_steps > 1 the next micro-batch's activations join every gradient, and
with gradient_checkpointing the first block is recomputed when nearly every gradient exists.
State counts in every phase but the load check: conservative for step 1, whose forward and
backward run before the optimizer makes its state.

Activations per sample and block are a N D + b L D bytes (N image tokens, D the width, L text
tokens). a and b were measured, not derived: the bytes autograd saves (saved_tensors_hooks) in
diffusers 0.42.1's SanaTransformerBlock on torch 2.13 (CPU) at widths 256 and 512, 256 and 1,024
tokens, 16 and 200 text tokens (mlp_ratio 2.5, as every Sana release), then rounded up about 10%;
the working memory of the backward (_WORK_BLOCKS) was fitted to whole trials' measured peaks.
Against a whole trial's measured peak on a CPU (tests/test_fit.py, every tensor counted) the
estimate is 1.07-1.33x on the tiny model and 1.08-1.27x on a 27M-parameter, 6-block one (LoRA
the highest: its frozen layers save less). It is not yet checked on a GPU, whose attention
kernels and allocator differ (no GPU was lent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tune_sana.config import Finetune, Precision, TrialConfig

if TYPE_CHECKING:
    from tune_sana.data.encoded import DataSplit

GIB = 1024**3

_AMP = (Precision.FP16_AMP, Precision.BF16_AMP)
_PURE = (Precision.FP16, Precision.BF16)
# The dtype each mode computes in; a checkpoint variant's native one is its own (None: fp32).
# damage.needs_native_check compares the same two (a test keeps them in step).
_COMPUTE = {Precision.FP32: "fp32", Precision.FP16_AMP: "fp16", Precision.FP16: "fp16",
            Precision.BF16_AMP: "bf16", Precision.BF16: "bf16"}

# Bytes autograd saves per block and sample, per N*D and per L*D: (a, b), (a, b with qk_norm).
_SAVED: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "fp32": ((172.0, 17.0), (200.0, 26.0)),
    "amp": ((100.0, 15.0), (140.0, 26.0)),
    "pure": ((96.0, 10.0), (122.0, 19.0)),
}
_CHECKPOINTED = (9.0, 8.0)  # a block's inputs, kept when its activations are recomputed
_WORK_BLOCKS = 0.25  # the backward's gradient buffers, in blocks' saved bytes
_BNB_MIN_8BIT = 4096  # bitsandbytes keeps smaller parameters' states in fp32
_BNB_BLOCK = 256


@dataclass(frozen=True)
class DataShape:
    """What the estimate needs of a dataset: one sample's latent (C, H, W) and text (L, dim)
    shapes, and the held-out sample counts the fixed evaluations take; ``train``: the training
    samples (preflight's batch check)."""

    latent: tuple[int, int, int]
    text: tuple[int, int]
    val: int
    retain: int = 0
    train: int = 0

    @classmethod
    def of(cls, split: DataSplit) -> DataShape:
        c, h, w = (int(n) for n in split.train.latents.shape[1:])
        length, dim = (int(n) for n in split.train.text.shape[1:])
        retain = len(split.retain) if split.retain is not None else 0
        return cls((c, h, w), (length, dim), len(split.val), retain, len(split.train))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by what holds them (see the module's docstring); ``total`` is the peak."""

    weights: int
    amp_copies: int
    gradients: int
    optimizer: int
    activations: int
    step_transient: int
    evaluation: int
    eval_data: int
    load_check: int
    params: int  # every parameter of the model
    trainable: int  # the ones the optimizer updates
    last_block: int = 0  # activations alive while the backward makes the last gradients
    accumulates: bool = False  # grad_accum_steps > 1

    @property
    def phases(self) -> dict[str, int]:
        """Each phase's bytes beyond the resident part."""
        train_state = self.gradients + self.optimizer
        backward = (self.gradients + self.activations if self.accumulates
                    else max(self.activations, self.gradients + self.last_block))
        return {"training": self.optimizer + backward,
                "optimizer step": train_state + self.step_transient,
                "evaluation": train_state + self.evaluation,
                "load check": self.load_check + self.evaluation}

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=lambda k: phases[k])

    @property
    def total(self) -> int:
        return self.weights + self.amp_copies + self.eval_data + max(self.phases.values())

    def describe(self) -> str:
        """The total and its main parts, in GiB, on one line: '46.6 GiB: weights 6.1, ...'."""
        parts = [("weights", self.weights), ("amp copies", self.amp_copies),
                 ("gradients", self.gradients), ("optimizer state", self.optimizer)]
        phase = self.peak_phase
        if phase == "training":
            parts.append(("activations", self.activations))
        elif phase == "optimizer step":
            parts.append(("optimizer step temporaries", self.step_transient))
        else:
            if phase == "load check":
                parts = [parts[0], parts[1], ("load-check copy", self.load_check)]
            parts.append(("evaluation forward", self.evaluation))
        shown = ", ".join(f"{name} {gib(n)}" for name, n in parts if n)
        return f"{gib(self.total)} GiB: {shown}"

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def gib(n: float) -> str:
    """Bytes as GiB with 2 significant decimals for small figures: '23.4', '0.0061'."""
    value = n / GIB
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def estimate(config: TrialConfig, model_config: Mapping[str, Any], data: DataShape,
             device_type: str = "cuda") -> MemoryEstimate:
    """Peak device memory of one trial, by part (bytes). ``device_type`` 'cpu' or 'cuda': on a
    CPU the evaluation draws share the dataset's tensors and AdamW steps one parameter at a
    time; on a GPU they are copies and AdamW's foreach step makes a state-sized temporary."""
    precision = Precision(config.precision)
    weight_bytes = 2 if precision in _PURE else 4
    compute_bytes = 4 if precision is Precision.FP32 else 2
    shapes = dict(param_shapes(model_config))
    n_params = sum(math.prod(s) for s in shapes.values())
    if Finetune(config.finetune) is Finetune.LORA:
        trainable = lora_shapes(shapes, config.lora_targets.split(","), config.lora_rank)
        train_bytes = 4 if precision is Precision.FP16 else weight_bytes  # lora.lora_dtype
    else:
        trainable, train_bytes = list(shapes.values()), weight_bytes
    n_train = sum(math.prod(s) for s in trainable)
    weights = (n_params * weight_bytes + n_train * train_bytes
               if Finetune(config.finetune) is Finetune.LORA else n_params * weight_bytes)

    geometry = _Geometry.of(model_config, data)
    native = 4 if config.variant is None else 2  # the native copy's weight dtype
    native_copy = (config.damage_tolerance is not None
                   and _COMPUTE[precision] != (config.variant or "fp32"))
    evaluation, eval_data = _evaluation(config, geometry, data, compute_bytes, device_type)
    optimizer, transient = _optimizer(config.optimizer, trainable, train_bytes, device_type)
    kept, last = _activations_per_sample(config, geometry, precision)
    inputs = _batch_inputs(config, data)
    return MemoryEstimate(
        weights=weights,
        amp_copies=2 * n_params if precision in _AMP else 0,
        gradients=n_train * train_bytes,
        optimizer=optimizer,
        activations=int(config.batch_size * (kept + last)) + inputs,
        step_transient=transient,
        evaluation=evaluation,
        eval_data=eval_data,
        load_check=n_params * native if native_copy else 0,
        params=n_params,
        trainable=n_train,
        last_block=int(config.batch_size * last) + inputs,
        accumulates=config.grad_accum_steps > 1,
    )


@dataclass(frozen=True)
class _Geometry:
    tokens: int  # N: latent pixels / patch^2
    width: int  # D
    text: int  # L
    caption: int  # the text encoder's width
    layers: int
    qk_norm: bool
    latent: int  # elements of one latent

    @classmethod
    def of(cls, config: Mapping[str, Any], data: DataShape) -> _Geometry:
        patch = int(config.get("patch_size", 1))
        c, h, w = data.latent
        return cls(tokens=(h // patch) * (w // patch),
                   width=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                   text=data.text[0], caption=data.text[1], layers=int(config["num_layers"]),
                   qk_norm=bool(config.get("qk_norm")), latent=c * h * w)


def _activations_per_sample(config: TrialConfig, g: _Geometry, precision: Precision
                            ) -> tuple[float, float]:
    """(the blocks' saved activations but the first's, the rest: what is still alive when the
    backward makes the last gradients) in bytes a sample."""
    kind = "fp32" if precision is Precision.FP32 else "amp" if precision in _AMP else "pure"
    a, b = _SAVED[kind][int(g.qk_norm)]
    block = a * g.tokens * g.width + b * g.text * g.width
    # patch embedding, caption projection, output layer; the fp32 flow loss (x_t, target, ...)
    outside = 16 * g.tokens * g.width + 8 * g.text * (g.caption + g.width) + 24 * g.latent
    if config.gradient_checkpointing:  # each block's inputs; one block recomputed at a time
        a_in, b_in = _CHECKPOINTED
        inputs = g.layers * (a_in * g.tokens * g.width + b_in * g.text * g.width)
        return 0.0, inputs + (1 + _WORK_BLOCKS) * block + outside
    return (g.layers - 1) * block, (1 + _WORK_BLOCKS) * block + outside


def _batch_inputs(config: TrialConfig, data: DataShape) -> int:
    """One optimizer step's samples on the device: latents, noise, text (fp32), mask (int64)."""
    length, dim = data.text
    c, h, w = data.latent
    per_sample = 4 * (2 * c * h * w + length * dim + 1) + 8 * length
    return config.batch_size * config.grad_accum_steps * per_sample


def _evaluation(config: TrialConfig, g: _Geometry, data: DataShape, compute_bytes: int,
                device_type: str) -> tuple[int, int]:
    """(one draw's forward without autograd, the draws held on the device). Measured: a
    no-grad forward peaks at 14 N D elements of the compute dtype a sample beyond the weights,
    at any depth (56 bytes per N D in fp32 at 1 and at 6 blocks); 16 here."""
    samples = min(config.val_batch_size, max(data.val, data.retain))
    forward = samples * (compute_bytes * (16 * g.tokens * g.width + 4 * g.text * g.width)
                         + 24 * g.latent)
    length, dim = data.text
    held = sum(min(config.val_batch_size, n) for n in (data.val, data.retain))
    noise = 4 * (g.latent + 1)  # each draw's noise and sigma
    copies = 4 * (g.latent + length * dim) + 8 * length  # x0, text, mask: copies on a GPU only
    per_sample = noise + (copies if device_type != "cpu" else 0)
    return forward, config.val_draws * held * per_sample


def _optimizer(name: str, trainable: list[tuple[int, ...]], param_bytes: int,
               device_type: str) -> tuple[int, int]:
    """(state bytes, step temporaries) of ``name`` over parameters of these shapes."""
    largest = max((math.prod(s) for s in trainable), default=0)
    total = sum(math.prod(s) for s in trainable)
    if name == "came":
        state = 0
        for shape in trainable:
            numel = math.prod(shape)
            if len(shape) >= 2:
                row, col = numel // shape[-1], numel // shape[-2]
                state += 4 * (numel + 2 * (row + col))
            else:
                state += 4 * 2 * numel
        return state, 4 * 3 * largest  # grad.float(), update, res: one parameter at a time
    if name == "adamw8bit":
        state = 0
        for shape in trainable:
            numel = math.prod(shape)
            if numel >= _BNB_MIN_8BIT:
                state += 2 * numel + 2 * 4 * math.ceil(numel / _BNB_BLOCK)
            else:
                state += 2 * 4 * numel
        return state, 0
    foreach = device_type == "cuda"
    return 2 * total * param_bytes, (total if foreach else 2 * largest) * param_bytes


def param_shapes(config: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter's name and shape in a SanaTransformer2DModel of this config, computed
    from the config as diffusers 0.42.1 builds the model (tests compare with a real one)."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    cin = int(config.get("in_channels", 32))
    cout = int(config.get("out_channels") or cin)
    patch = int(config.get("patch_size", 1))
    heads_c = config.get("num_cross_attention_heads", 20)
    dim_c = config.get("cross_attention_head_dim", 112)
    cross = config.get("cross_attention_dim", 2240)
    qk = bool(config.get("qk_norm"))
    hidden = int(float(config.get("mlp_ratio", 2.5)) * d)
    out: list[tuple[str, tuple[int, ...]]] = [("scale_shift_table", (2, d))]

    def linear(name: str, fan_out: int, fan_in: int, bias: bool = True) -> None:
        out.append((f"{name}.weight", (fan_out, fan_in)))
        if bias:
            out.append((f"{name}.bias", (fan_out,)))

    out += [("patch_embed.proj.weight", (d, cin, patch, patch)), ("patch_embed.proj.bias", (d,))]
    embedders = (["time_embed.timestep_embedder", "time_embed.guidance_embedder"]
                 if config.get("guidance_embeds") else ["time_embed.emb.timestep_embedder"])
    for embedder in embedders:
        linear(f"{embedder}.linear_1", d, 256)
        linear(f"{embedder}.linear_2", d, d)
    linear("time_embed.linear", 6 * d, d)
    linear("caption_projection.linear_1", d, int(config.get("caption_channels", 2304)))
    linear("caption_projection.linear_2", d, d)
    out.append(("caption_norm.weight", (d,)))
    bias = bool(config.get("attention_bias", False))
    for i in range(int(config["num_layers"])):
        block = f"transformer_blocks.{i}"
        out.append((f"{block}.scale_shift_table", (6, d)))
        for proj in ("to_q", "to_k", "to_v"):
            linear(f"{block}.attn1.{proj}", d, d, bias)
        linear(f"{block}.attn1.to_out.0", d, d)
        if qk:
            out += [(f"{block}.attn1.norm_q.weight", (d,)), (f"{block}.attn1.norm_k.weight", (d,))]
        if cross is not None:
            inner = int(heads_c) * int(dim_c)
            linear(f"{block}.attn2.to_q", inner, d)
            linear(f"{block}.attn2.to_k", inner, int(cross))
            linear(f"{block}.attn2.to_v", inner, int(cross))
            linear(f"{block}.attn2.to_out.0", d, inner)
            if qk:
                out += [(f"{block}.attn2.norm_q.weight", (inner,)),
                        (f"{block}.attn2.norm_k.weight", (inner,))]
            if config.get("norm_elementwise_affine"):
                out += [(f"{block}.norm2.weight", (d,)), (f"{block}.norm2.bias", (d,))]
        out += [(f"{block}.ff.conv_inverted.weight", (2 * hidden, d, 1, 1)),
                (f"{block}.ff.conv_inverted.bias", (2 * hidden,)),
                (f"{block}.ff.conv_depth.weight", (2 * hidden, 1, 3, 3)),
                (f"{block}.ff.conv_depth.bias", (2 * hidden,)),
                (f"{block}.ff.conv_point.weight", (d, hidden, 1, 1))]
    linear("proj_out", patch * patch * cout, d)
    return out


def lora_shapes(shapes: Mapping[str, tuple[int, ...]], targets: list[str], rank: int
                ) -> list[tuple[int, ...]]:
    """The LoRA adapter's parameter shapes on the modules ``targets`` names (peft's match: the
    module's name is the target or ends with '.' + target): A (r, in[, k, k]) and
    B (out, r[, 1, 1])."""
    out: list[tuple[int, ...]] = []
    for name, shape in shapes.items():
        module, _, kind = name.rpartition(".")
        if kind != "weight" or len(shape) not in (2, 4):
            continue
        if any(module == t or module.endswith("." + t) for t in targets):
            if len(shape) == 2:
                out += [(rank, shape[1]), (shape[0], rank)]
            else:
                out += [(rank, *shape[1:]), (shape[0], rank, 1, 1)]
    return out
