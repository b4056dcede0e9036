"""CAME from came-pytorch (the optional extra ``came``), with its fp32 state kept on load.

Imported only when a trial's optimizer is ``came``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from came_pytorch import CAME


class Came(CAME):  # type: ignore[misc]
    """came-pytorch's CAME (Luo et al. 2023), the optimizer Sana trains with.

    CAME computes in fp32 and keeps fp32 state also over fp16/bf16 weights. torch's
    ``Optimizer.load_state_dict`` rounds every floating state tensor to its parameter's dtype, so
    a trial resumed from a checkpoint would go on from bf16-rounded moments and drift from the
    run it continues; here each state tensor is put back exactly as it was saved (on the
    parameter's device), as torch itself does when the dtypes already agree.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        param_of = dict(zip(saved_ids, params, strict=True))
        saved = {param_of[i]: {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
                 for i, state in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for param, tensors in saved.items():
            for key, value in tensors.items():
                self.state[param][key] = value.to(device=param.device)
