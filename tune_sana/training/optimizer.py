"""The optimizer a trial trains with, chosen by ``config.optimizer``, over the trainable parameters.

| optimizer     | package (extra)        | state per trainable parameter               | runs on |
|---------------|------------------------|---------------------------------------------|---------|
| ``adamw``     | torch                  | exp_avg, exp_avg_sq in the parameter dtype  | any     |
| ``came``      | came-pytorch (came)    | fp32 exp_avg; fp32 row/column factors of    | any     |
|               |                        | the second moment and the instability       |         |
| ``adamw8bit`` | bitsandbytes (8bit)    | exp_avg, exp_avg_sq quantised to 8 bits     | CUDA    |

All three start at the peak ``lr`` (a scheduler scales it) with ``weight_decay``. Betas 1 and 2 are
``adam_beta1``/``adam_beta2`` for all three; CAME adds ``came_beta3`` and its two eps
(``came_eps1`` on the squared gradient, ``came_eps2`` on the instability); the AdamWs use
``adam_eps``. The config's defaults for CAME are Sana's: betas 0.9/0.999/0.9999, eps 1e-30/1e-16,
weight decay 0. A missing package or adamw8bit on a CPU is a one-line UserError, raised by
preflight before a sweep starts and by the trial before it loads its model.
"""

from __future__ import annotations

import importlib.util

import torch

from tune_sana.config import TrialConfig, UserError

OPTIMIZERS: tuple[str, ...] = ("adamw", "came", "adamw8bit")
# optimizer -> (the module it imports, the pip package, the tune-sana extra that installs it)
_EXTRAS: dict[str, tuple[str, str, str]] = {
    "came": ("came_pytorch", "came-pytorch", "came"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes", "8bit"),
}
CUDA_ONLY: frozenset[str] = frozenset({"adamw8bit"})


def check_available(name: str, device: torch.device | None = None) -> None:
    """UserError (one line, with the fix) when optimizer ``name`` cannot run: its package is not
    installed, or it is CUDA-only and ``device`` is not a GPU. ``device=None`` checks the package
    only (the device is not known yet)."""
    if name in CUDA_ONLY and device is not None and device.type != "cuda":
        raise UserError(f"optimizer '{name}' runs only on a CUDA GPU (bitsandbytes) but this "
                        f"trial runs on the {device.type.upper()}; use optimizer adamw or came, "
                        "or device cuda with resources.gpu > 0")
    if name in _EXTRAS:
        module, package, extra = _EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"optimizer '{name}' needs the optional extra '{extra}' ({package}), "
                            f"which is not installed: pip install 'tune-sana[{extra}]'")


def make_optimizer(params: list[torch.nn.Parameter], config: TrialConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over ``params``, set from the config.

    State dtypes: AdamW's follow the parameters (fp32 under the amp modes, fp16/bf16 in pure
    fp16/bf16); CAME computes in fp32 and keeps fp32 state over any weights (also after a
    checkpoint is loaded); 8-bit AdamW quantises its state (bitsandbytes keeps tensors under 4096
    elements in 32 bits). NaN in a gradient is not filtered by any of them: the trial's guard
    checks the gradient norm before ``step()``.
    """
    check_available(config.optimizer)
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "came":
        from tune_sana.training._came import Came

        return Came(params, lr=config.lr, betas=(*betas, config.came_beta3),
                    eps=(config.came_eps1, config.came_eps2), weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(
            params, lr=config.lr, betas=betas, eps=config.adam_eps,
            weight_decay=config.weight_decay)
        return optimizer
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=betas,
                             eps=config.adam_eps)
