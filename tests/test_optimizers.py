"""The optimizer as a searchable setting: adamw, came (extra ``came``), adamw8bit (extra ``8bit``,
CUDA only). Their settings are validated, a missing extra or adamw8bit on a CPU is one line before
any training, a corrupted gradient is caught at its step with each, and a resumed trial goes on
exactly as if it had never stopped (the optimizer's state is in the checkpoint)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import fast_config
from tests.test_trial import TIMING, _assert_diverged, _corrupt_grad_at, _Killed
from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.training import optimizer as optim
from tune_sana.training.checkpoint import LocalCheckpointer

Rows = list[dict[str, Any]]

HAS_8BIT = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
ADAMW8BIT = pytest.param("adamw8bit", marks=pytest.mark.skipif(
    not HAS_8BIT, reason="adamw8bit needs a CUDA GPU and bitsandbytes"))
AVAILABLE = ["adamw", "came", ADAMW8BIT]
CPU_REFUSAL = ("optimizer 'adamw8bit' runs only on a CUDA GPU (bitsandbytes) but this trial runs "
               "on the CPU; use optimizer adamw or came, or device cuda with resources.gpu > 0")


def _config(optimizer: str, **overrides: Any) -> Any:
    device = "cuda" if optimizer == "adamw8bit" else "cpu"
    return fast_config(optimizer=optimizer, device=device, **overrides)


# --- settings ------------------------------------------------------------------------------------

def test_came_defaults_are_sanas() -> None:
    config = fast_config(optimizer="came")
    assert (config.adam_beta1, config.adam_beta2, config.came_beta3) == (0.9, 0.999, 0.9999)
    assert (config.came_eps1, config.came_eps2, config.weight_decay) == (1e-30, 1e-16, 0.0)
    group = optim.make_optimizer([nn.Parameter(torch.ones(3, 2))], config).param_groups[0]
    assert group["betas"] == (0.9, 0.999, 0.9999) and group["eps"] == (1e-30, 1e-16)
    assert group["weight_decay"] == 0.0 and group["lr"] == config.lr


def test_adamw_takes_its_settings() -> None:
    config = fast_config(adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.01)
    opt = optim.make_optimizer([nn.Parameter(torch.ones(2))], config)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.01)


@pytest.mark.parametrize(("key", "value"), [
    ("came_beta3", 1.0), ("came_beta3", -0.1), ("adam_beta1", 1.0), ("adam_beta2", -0.5),
    ("came_eps1", 0.0), ("came_eps2", -1e-16), ("came_eps1", math.inf), ("adam_eps", 0.0),
    ("weight_decay", -0.1), ("optimizer", "adam"), ("grad_accum_steps", 0),
])
def test_bad_optimizer_settings_are_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(UserError, match=f"key '{key}'"):
        fast_config(**{"optimizer": "came", key: value})


def test_optimizer_is_a_searchable_choice(tmp_path: Path) -> None:
    from tune_sana.engine import space

    file = tmp_path / "space.yaml"
    file.write_text(SPACE.replace("adamw8bit", "came").replace("DEVICE", "cpu").replace("GPU", "0"))
    spec = space.load(file)
    assert spec.space["optimizer"].values() == ["adamw", "came"]
    file.write_text(file.read_text().replace("came]", "adam]"))
    with pytest.raises(UserError, match="key 'optimizer' = 'adam'"):
        space.load(file)


def test_adamw8bit_takes_the_adamw_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # bitsandbytes is CUDA-only and absent here: a stand-in module with its AdamW8bit's signature
    # (params, lr, betas, eps, weight_decay) checks what the trial passes it.
    import importlib.machinery
    import sys
    import types

    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    fake.optim = types.SimpleNamespace(AdamW8bit=torch.optim.AdamW)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    config = fast_config(optimizer="adamw8bit", adam_beta1=0.8, adam_eps=1e-6, weight_decay=0.1)
    group = optim.make_optimizer([nn.Parameter(torch.ones(2))], config).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        config.lr, (0.8, 0.999), 1e-6, 0.1)


# --- a missing extra, adamw8bit on a CPU: one line before any training ---------------------------

def _without(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else find_spec(name, *a))


def test_missing_came_extra_is_one_line_before_the_model_loads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _without("came_pytorch", monkeypatch)
    from trials import sana_finetune

    loaded: list[nn.Module] = []
    with pytest.raises(UserError) as err:
        sana_finetune.run(fast_config(optimizer="came"), lambda row: None, on_model=loaded.append)
    message = str(err.value)
    assert "\n" not in message and not loaded
    assert "extra 'came'" in message and "pip install 'tune-sana[came]'" in message


def test_missing_8bit_extra_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _without("bitsandbytes", monkeypatch)
    with pytest.raises(UserError, match=r"extra '8bit'.*pip install 'tune-sana\[8bit\]'"):
        optim.check_available("adamw8bit", torch.device("cuda"))


def test_trial_refuses_adamw8bit_on_a_cpu_before_the_model_loads() -> None:
    from trials import sana_finetune

    loaded: list[nn.Module] = []
    with pytest.raises(UserError) as err:
        sana_finetune.run(fast_config(optimizer="adamw8bit"), lambda row: None,
                          on_model=loaded.append)
    assert str(err.value) == CPU_REFUSAL
    assert not loaded


SPACE = """\
trial: sana_finetune
search: {algorithm: random, num_samples: 2}
scheduler: {type: fifo}
resources: {cpu: 1, gpu: GPU}
fixed: {steps: 5, model: sana-tiny, device: DEVICE}
space:
  lr: {loguniform: [1.0e-5, 1.0e-2]}
  optimizer: {choice: [adamw, adamw8bit]}
"""


def _sweep(tmp_path: Path, device: str, gpu: float, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("DEVICE", device).replace("GPU", str(gpu)))
    return ["sweep", str(space), "--storage", str(tmp_path / "runs"), *extra]


@pytest.mark.parametrize(("device", "gpu"), [("cpu", 0), ("auto", 0)])
def test_preflight_refuses_adamw8bit_on_a_cpu_with_the_trials_line(
        device: str, gpu: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_sweep(tmp_path, device, gpu)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tune-sana: error: {CPU_REFUSAL}"
    assert not list(tmp_path.rglob("sweep.yaml"))


def test_preflight_refuses_a_missing_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _without("came_pytorch", monkeypatch)
    assert main(_sweep(tmp_path, "cpu", 0, "--set", "optimizer=came")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'tune-sana[came]'" in err
    assert not list(tmp_path.rglob("sweep.yaml"))


def test_preflight_lets_adamw8bit_through_where_trials_get_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tune_sana.engine import preflight, space

    _without("bitsandbytes", monkeypatch)  # so only the extra is left to complain
    spec = space.SweepSpec.model_validate({
        "trial": "sana_finetune", "resources": {"gpu": 0.5},
        "fixed": {"device": "auto", "optimizer": "adamw8bit", "model": "sana-tiny"}})
    with pytest.raises(UserError, match="extra '8bit'"):
        preflight._check_optimizers(spec)


# --- corrupted gradients, with each optimizer -----------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", AVAILABLE)
def test_corrupted_gradient_is_caught_at_its_step(name: str, value: float) -> None:
    from trials import sana_finetune

    rows: Rows = []
    param = "transformer_blocks.1.attn1.to_k.weight"
    summary = sana_finetune.run(_config(name, steps=6, max_grad_norm=0.1), rows.append,
                                on_model=_corrupt_grad_at(rows, param, {3}, value))
    _assert_diverged(rows, summary, 3, "nonfinite_grad", "gradient", param)


# --- checkpoint and resume ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "precision"), [
    ("came", "fp32"), ("came", "bf16"), ("adamw", "bf16"), pytest.param(
        "adamw8bit", "bf16-amp", marks=ADAMW8BIT.marks)])
def test_resumed_trial_matches_an_uninterrupted_one(name: str, precision: str,
                                                    tmp_path: Path) -> None:
    # Killed at step 5 after a checkpoint at step 4: the optimizer's state (for CAME its fp32
    # moments, also over bf16 weights) comes back with the weights, so steps 5-6 repeat exactly.
    config = _config(name, precision=precision, steps=6, eval_every=2, checkpoint_every=2,
                     lr=1e-3)
    from trials import sana_finetune

    reference: Rows = []
    sana_finetune.run(config, reference.append)

    rows: Rows = []

    def killed_at_5(row: dict[str, Any]) -> None:
        if row["step"] == 5:
            raise _Killed
        rows.append(row)

    checkpointer = LocalCheckpointer(tmp_path / "ckpt")
    with pytest.raises(_Killed):
        sana_finetune.run(config, killed_at_5, checkpoint=checkpointer)
    summary = sana_finetune.run(config, rows.append, checkpoint=checkpointer)
    assert summary["outcome"] == "completed" and [row["step"] for row in rows] == list(range(7))
    for got, want in zip(rows, reference, strict=True):
        assert {k: v for k, v in got.items() if k not in TIMING} == {
            k: v for k, v in want.items() if k not in TIMING}


def test_came_state_stays_fp32_over_bf16_weights_after_a_load() -> None:
    # torch's load_state_dict would round them to bf16 (and a resumed trial would drift).
    config = fast_config(optimizer="came")
    weight = nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    first = optim.make_optimizer([weight], config)
    weight.grad = torch.linspace(0.1, 1.3, 12).view(4, 3).to(torch.bfloat16)
    first.step()
    saved = {k: v.clone() for k, v in first.state[weight].items() if isinstance(v, torch.Tensor)}
    assert saved["exp_avg"].dtype == saved["exp_avg_sq_row"].dtype == torch.float32
    assert not torch.equal(saved["exp_avg"], saved["exp_avg"].bfloat16().float())
    second = optim.make_optimizer([weight], config)
    second.load_state_dict(first.state_dict())
    loaded = {k: v for k, v in second.state[weight].items() if isinstance(v, torch.Tensor)}
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
