"""The built-in shapes data and encoded dataset folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tune_sana.config import UserError
from tune_sana.data import encoded as D


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, list[str]]:
    return D.shapes_images()


def test_builtin_shapes_is_deterministic(shapes: tuple[torch.Tensor, list[str]]) -> None:
    images, captions = shapes
    again_images, again_captions = D.shapes_images()
    assert torch.equal(images, again_images) and captions == again_captions
    assert images.shape == (D.BUILTIN_SIZE, 3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1
    one, two = D.load_data("builtin:shapes"), D.load_data("builtin:shapes")
    for a, b in ((one.train, two.train), (one.val, two.val)):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.text, b.text)
        assert torch.equal(a.mask, b.mask)


def test_captions_determine_images(shapes: tuple[torch.Tensor, list[str]]) -> None:
    # Same caption -> nearly the same picture (jitter of half a pixel, faint background noise);
    # different captions -> clearly different pictures.
    images, captions = shapes
    by_caption: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        by_caption.setdefault(caption, []).append(i)
    pairs = [idx[:2] for idx in by_caption.values() if len(idx) >= 2]
    assert len(pairs) > 50
    same = torch.stack([(images[a] - images[b]).abs().mean() for a, b in pairs])
    others = [(i, i + 1) for i in range(200) if captions[i] != captions[i + 1]]
    different = torch.stack([(images[a] - images[b]).abs().mean() for a, b in others])
    assert same.mean() * 3 < different.mean()
    assert float(same.max()) < float(different.median())


def test_text_encoding_is_a_function_of_the_caption() -> None:
    text, mask = D.demo_encode_text(["a small red circle at the top left", "a large red circle"])
    again, _ = D.demo_encode_text(["a large red circle"])
    assert text.shape == (2, D.TEXT_LEN, D.TEXT_DIM) and mask.dtype == torch.int64
    assert mask.sum(1).tolist() == [8, 4]
    assert torch.equal(again[0], text[1]) and not torch.equal(text[0], text[1])
    assert (text[1, 4:] == 0).all()


def test_pretrain_finetune_and_val_ranges_are_disjoint(
    shapes: tuple[torch.Tensor, list[str]],
) -> None:
    latents = D.demo_encode_images(shapes[0])
    pretrain, finetune = D.load_data("builtin:shapes", "pretrain"), D.load_data("builtin:shapes")
    end_train = D.BUILTIN_SIZE - D.VAL_SIZE
    assert torch.equal(pretrain.train.latents, latents[:D.PRETRAIN_END])
    assert torch.equal(finetune.train.latents, latents[D.PRETRAIN_END:end_train])
    assert torch.equal(finetune.val.latents, latents[end_train:])
    assert torch.equal(pretrain.val.latents, finetune.val.latents)
    assert D.PRETRAIN_END < end_train
    assert len(finetune.train) == finetune.meta["train"] == end_train - D.PRETRAIN_END


def test_unknown_builtin_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown built-in dataset 'builtin:mnist'"):
        D.load_data("builtin:mnist")


def _small(n: int = 6) -> tuple[D.Encoded, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    encoded = D.Encoded(torch.randn(n, 4, 2, 2, generator=gen), torch.randn(n, 3, 5, generator=gen),
                        torch.ones(n, 3, dtype=torch.int64))
    return encoded, torch.tensor([False, True] * (n // 2))


def test_save_and_load_encoded_round_trip(tmp_path: Path) -> None:
    encoded, is_val = _small()
    folder = D.save_encoded(tmp_path / "cache", encoded, is_val, {"model": "tiny"})
    loaded = D.load_data(str(folder))
    assert torch.equal(loaded.train.latents, encoded.latents[~is_val])
    assert torch.equal(loaded.val.text, encoded.text[is_val])
    assert loaded.val.mask.dtype == torch.int64 and loaded.train.latents.dtype == torch.float32
    assert loaded.meta == {"format": D.CACHE_FORMAT, "model": "tiny"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temp folder left behind


def test_save_encoded_refuses_to_overwrite(tmp_path: Path) -> None:
    encoded, is_val = _small()
    D.save_encoded(tmp_path / "cache", encoded, is_val, {})
    with pytest.raises(UserError, match="already exists"):
        D.save_encoded(tmp_path / "cache", encoded, is_val, {})


def test_missing_or_incomplete_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        D.load_data(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / D.META_FILE).write_text("{}")
    with pytest.raises(UserError, match="not an encoded dataset"):
        D.load_data(str(tmp_path / "half"))


def test_corrupt_folder_is_a_user_error(tmp_path: Path) -> None:
    encoded, is_val = _small()
    folder = D.save_encoded(tmp_path / "cache", encoded, is_val, {})
    tensors = folder / D.ENCODED_FILE
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # torn write
    with pytest.raises(UserError, match="corrupt encoded dataset"):
        D.load_data(str(folder))
    tensors.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt encoded dataset") as err:
        D.load_data(str(folder))
    assert str(folder) in str(err.value)
    (folder / D.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt encoded dataset"):
        D.load_data(str(folder))


def test_folder_without_val_rows_is_a_user_error(tmp_path: Path) -> None:
    encoded, _ = _small()
    folder = D.save_encoded(tmp_path / "c", encoded, torch.zeros(len(encoded), dtype=torch.bool),
                            {})
    assert json.loads((folder / D.META_FILE).read_text())["format"] == D.CACHE_FORMAT
    with pytest.raises(UserError, match="needs both training and validation rows"):
        D.load_data(str(folder))
