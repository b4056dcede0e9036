"""Pictures of what each trial learned (training/sampling.py, engine/samples.py): the Euler
sampler against the training objective, the decoders, and the grids a sweep writes."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import fast_config, run_trial
from tune_sana.data.encoded import demo_decode_images, demo_encode_images, shapes_images
from tune_sana.engine.samples import keep, path_of
from tune_sana.outcomes import BASE_SAMPLES, BASE_SAMPLES_KEY, SAMPLES_KEY
from tune_sana.record.readers import read_trials
from tune_sana.training.flow import FlowBatch, flow_loss, sample_sigmas
from tune_sana.training.sampling import (
    TILE_MIN,
    decoder_for,
    euler_sample,
    grid_png,
    shifted_levels,
)


class ExactVelocity(nn.Module):
    """Predicts the true velocity eps - x0 of the straight path through ``x0``: at
    x_s = (1 - s) x0 + s eps that is (x_s - x0) / s, with s read back from the timestep the
    way flow.py feeds it (s x 1000)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor, timestep: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        s = (timestep / 1000).view(-1, 1, 1, 1)
        return ((hidden_states - self.x0) / s,)


def _world(n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 12, 8, 8, generator=gen)
    noise = torch.randn(n, 12, 8, 8, generator=gen)
    return x0, noise, torch.randn(n, 10, 32, generator=gen), torch.ones(n, 10, dtype=torch.long)


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (10, 1.0), (7, 3.0)])
def test_exact_velocity_takes_the_sampler_to_the_data(steps: int, shift: float) -> None:
    x0, noise, text, mask = _world()
    model = ExactVelocity(x0)
    out = euler_sample(model, noise, text, mask, steps, shift, torch.float32)
    assert torch.allclose(out, x0, atol=1e-4)
    # the same model has zero training loss: sampler and objective share sign and timestep
    sigmas = sample_sigmas(len(x0), torch.Generator().manual_seed(1), 0.0, 1.0, shift)
    loss = flow_loss(model, FlowBatch(x0, noise, sigmas, text, mask), torch.float32)
    assert loss.item() < 1e-8
    # a model that gets the direction wrong does not land on the data
    wrong = lambda **kw: (-model(**kw)[0],)  # noqa: E731
    flipped = euler_sample(wrong, noise, text, mask, steps, shift,  # type: ignore[arg-type]
                           torch.float32)
    assert not torch.allclose(flipped, x0, atol=1e-2)


def test_levels_run_from_noise_to_data_and_shift_like_training() -> None:
    levels = shifted_levels(4, 3.0)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and bool((levels.diff() < 0).all())
    s = torch.tensor(0.75)
    assert torch.isclose(levels[1], 3.0 * s / (1 + 2.0 * s))


def test_demo_decode_inverts_the_demo_encode_exactly() -> None:
    images, _ = shapes_images(8, seed=3, world="finetune")
    assert torch.equal(demo_decode_images(demo_encode_images(images)), images)
    latents = torch.randn(2, 12, 8, 8)
    assert torch.equal(demo_encode_images(demo_decode_images(latents)), latents)


def test_a_cache_decodes_with_its_autoencoder(tmp_path: Path) -> None:
    """A cache multiplied the latents by scaling_factor; the decoder divides it back out."""
    from diffusers import AutoencoderDC

    from tune_sana.testing.tiny_sana import tiny_vae

    pipe = tmp_path / "pipe"
    tiny_vae().save_pretrained(pipe / "vae")  # what the decoder loads of a pipeline folder
    vae: Any = AutoencoderDC.from_pretrained(pipe, subfolder="vae")
    images, _ = shapes_images(2)
    with torch.no_grad():
        latents = vae.encode(images).latent
        want = vae.decode(latents).sample
    decode = decoder_for({"model": str(pipe), "variant": None}, torch.device("cpu"))
    assert decode is not None
    got = decode(latents * vae.config.scaling_factor)
    assert torch.allclose(got, want, atol=1e-5)
    assert decoder_for({"source": "random"}, torch.device("cpu")) is None


def test_grid_png_is_one_row_of_enlarged_tiles() -> None:
    from PIL import Image

    images = torch.full((3, 3, 16, 16), -1.0)
    images[1, 0] = 1.0  # a red tile
    images[2, 1] = float("nan")  # non-finite pixels draw black, never fail
    picture = Image.open(io.BytesIO(grid_png(images)))
    assert picture.size == (3 * TILE_MIN + 4 * 2, TILE_MIN + 2 * 2)
    assert picture.getpixel((2 + TILE_MIN + 2 + 5, 10)) == (255, 0, 0)


def test_sample_steps_0_draws_nothing_and_unknown_data_draws_nothing() -> None:
    from tune_sana.data.encoded import Encoded, demo_encode_text
    from tune_sana.training.models import tiny_model
    from tune_sana.training.sampling import SampleGrid

    model, cpu = tiny_model(seed=0), torch.device("cpu")
    images, captions = shapes_images(3)
    val = Encoded(demo_encode_images(images), *demo_encode_text(captions))
    assert SampleGrid(val, {"source": "builtin:shapes"}, 0, 1.0, cpu).grid(
        model, torch.float32) is None
    assert SampleGrid(val, {"source": "random"}, 2, 1.0, cpu).grid(model, torch.float32) is None
    drawn = SampleGrid(val, {"source": "builtin:shapes"}, 2, 1.0, cpu).grid(model, torch.float32)
    assert drawn is not None and base64.b64decode(drawn).startswith(b"\x89PNG")
    assert model.training  # put back in train mode after drawing


def record_run(run_dir: Path, trials: dict[str, dict[str, Any]]) -> None:
    """Run each trial config (trial id -> TrialConfig values over conftest's FAST) with the real
    trial program and hand its rows, sanitized as the trial runtime does, to the real recorder
    through Tune's hooks (stand-in trials, as tests/test_engine_recorder.py drives it): a run
    directory as a sweep writes it, without starting Ray."""
    from tests.conftest import FAST
    from tests.test_engine_recorder import FakeTrial
    from tune_sana.engine import space
    from tune_sana.engine.recorder import ResultsRecorder
    from tune_sana.engine.stopping import sanitize

    spec = space.parse_spec({
        "trial": "sana_finetune", "search": {"algorithm": "random", "num_samples": len(trials)},
        "scheduler": {"type": "fifo"}, "fixed": FAST,
        "space": {"lr": {"loguniform": [1e-5, 1e-2]}, "precision": {"choice": ["fp32", "fp16"]}},
    }, "test")
    recorder = ResultsRecorder(str(run_dir), spec.to_yaml(), progress_every_s=1e9,
                               stream=io.StringIO(), fixed=dict(spec.fixed))
    recorder.setup()
    # a searched key a trial's config lacks reads as null: give each its precision
    stand_ins = [FakeTrial(tid, {"precision": "fp32", "sample_steps": 10, **values})
                 for tid, values in trials.items()]
    for trial in stand_ins:
        recorder.on_trial_start(0, stand_ins, trial)
        rows, _ = run_trial(fast_config(**trial.config))
        for row in rows:
            trial.last_result = sanitize(row)
            recorder.on_trial_result(0, stand_ins, trial, dict(trial.last_result))
        recorder.on_trial_complete(0, stand_ins, trial)
    recorder.on_experiment_end(stand_ins)
    (run_dir / "sweep.yaml").write_text(spec.to_yaml())


def test_a_recorded_run_has_completed_grids_and_none_for_a_diverged_trial(
        sample_run: Path) -> None:
    """The grid rides in the summary row to the driver's recorder, which writes the PNG;
    the base's comes with the first step-0 row; a diverged trial has none."""
    from PIL import Image

    rows = {r["trial_id"]: r for r in read_trials(sample_run).to_pylist()}
    assert [rows[t]["outcome"] for t in ("good", "slow", "bad")] == [
        "completed", "completed", "diverged"]
    for name in ("good", "slow", BASE_SAMPLES):
        grid = Image.open(path_of(sample_run, name).path)
        assert grid.format == "PNG" and grid.size == (4 * TILE_MIN + 5 * 2, TILE_MIN + 2 * 2)
    assert path_of(sample_run, "good").path != path_of(sample_run, "slow").path
    assert not path_of(sample_run, "bad").exists()
    assert SAMPLES_KEY not in rows["good"]  # pictures never enter the Parquet record


def test_the_driver_keeps_the_first_base_grid_and_drops_what_is_no_png(tmp_path: Path) -> None:
    first = base64.b64encode(grid_png(torch.zeros(1, 3, 16, 16))).decode()
    second = base64.b64encode(grid_png(torch.ones(2, 3, 16, 16))).decode()
    keep(str(tmp_path), "a", {BASE_SAMPLES_KEY: first, SAMPLES_KEY: "not base64!"})
    row = {BASE_SAMPLES_KEY: second, SAMPLES_KEY: base64.b64encode(b"GIF89a").decode()}
    keep(str(tmp_path), "b", row)
    assert row == {}  # popped: nothing of it reaches the record
    assert Path(path_of(tmp_path, BASE_SAMPLES).path).read_bytes() == base64.b64decode(first)
    assert not path_of(tmp_path, "a").exists() and not path_of(tmp_path, "b").exists()
