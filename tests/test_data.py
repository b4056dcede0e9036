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


@pytest.fixture(scope="module")
def splits() -> tuple[D.DataSplit, D.DataSplit]:
    return D.load_data("builtin:shapes", "pretrain"), D.load_data("builtin:shapes")


def _same(a: D.Encoded, b: D.Encoded) -> bool:
    return (torch.equal(a.latents, b.latents) and torch.equal(a.text, b.text)
            and torch.equal(a.mask, b.mask))


def _captions(world: str) -> list[str]:
    if world == "pretrain":
        return D.shapes_images(D.PRETRAIN_SIZE + D.RETAIN_SIZE, D.PRETRAIN_SEED, world)[1]
    return D.shapes_images(D.FINETUNE_SIZE + D.VAL_SIZE, D.FINETUNE_SEED, world)[1]


def test_builtin_shapes_is_deterministic(shapes: tuple[torch.Tensor, list[str]],
                                         splits: tuple[D.DataSplit, D.DataSplit]) -> None:
    images, captions = shapes
    again_images, again_captions = D.shapes_images()
    assert torch.equal(images, again_images) and captions == again_captions
    assert images.shape == (D.PRETRAIN_SIZE + D.RETAIN_SIZE, 3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1
    paper, _ = D.shapes_images(8, D.FINETUNE_SEED, "finetune")
    assert paper.min() >= -1 and paper.max() <= 1
    pretrain, finetune = splits
    again_pretrain, again_finetune = D.load_data("builtin:shapes", "pretrain"), D.load_data(
        "builtin:shapes")
    for one, two in ((pretrain, again_pretrain), (finetune, again_finetune)):
        assert _same(one.train, two.train) and _same(one.val, two.val)
        assert one.retain is not None and two.retain is not None
        assert _same(one.retain, two.retain)


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
    text, mask = D.demo_encode_text(["a small red ring at the top left on paper",
                                     "a large red circle"])
    again, _ = D.demo_encode_text(["a large red circle"])
    assert text.shape == (2, D.TEXT_LEN, D.TEXT_DIM) and mask.dtype == torch.int64
    assert mask.sum(1).tolist() == [10, 4]
    assert torch.equal(again[0], text[1]) and not torch.equal(text[0], text[1])
    assert (text[1, 4:] == 0).all()


def test_the_finetune_world_is_new_to_the_pretraining_one() -> None:
    # Every fine-tune caption says "on paper" and fits in TEXT_LEN; no pretraining caption uses
    # a word that only the fine-tune has.
    new_words = {*D.PAPER_WORDS.split(), "ring", "black"}
    pretrain, finetune = _captions("pretrain"), _captions("finetune")
    assert all(c.endswith(D.PAPER_WORDS) for c in finetune)
    assert all(len(c.split()) <= D.TEXT_LEN for c in pretrain + finetune)
    assert not any(new_words & set(c.split()) for c in pretrain)
    seen = {w for c in finetune for w in c.split()}
    assert new_words <= seen
    # the backgrounds differ (a corner pixel is background in every picture)
    dark, _ = D.shapes_images(64, D.PRETRAIN_SEED, "pretrain")
    paper, _ = D.shapes_images(64, D.FINETUNE_SEED, "finetune")
    assert abs(float(dark[:, :, 0, 0].mean()) - D.DARK) < 0.05
    assert torch.allclose(paper[:, :, 0, 0].mean(0), torch.tensor(D.PAPER), atol=0.05)


def test_parts_are_disjoint_and_sized(shapes: tuple[torch.Tensor, list[str]],
                                      splits: tuple[D.DataSplit, D.DataSplit]) -> None:
    latents = D.demo_encode_images(shapes[0])
    pretrain, finetune = splits
    assert pretrain.retain is not None and finetune.retain is not None
    # the base trains on the first PRETRAIN_SIZE pretraining draws; retain is the rest of them
    assert torch.equal(pretrain.train.latents, latents[:D.PRETRAIN_SIZE])
    assert torch.equal(finetune.retain.latents, latents[D.PRETRAIN_SIZE:])
    assert _same(pretrain.val, finetune.retain) and _same(pretrain.retain, finetune.retain)
    assert len(finetune.train) == finetune.meta["train"] == D.FINETUNE_SIZE + D.PRIOR_SIZE
    assert finetune.meta["prior"] == D.PRIOR_SIZE
    # the fine-tuning set: paper pictures first, then the prior (pretraining-world) ones
    words = finetune.train.mask.sum(1)
    assert (words[:D.FINETUNE_SIZE] >= 9).all() and (words[D.FINETUNE_SIZE:] <= 8).all()
    assert len(finetune.val) == finetune.meta["val"] == D.VAL_SIZE
    assert len(finetune.retain) == finetune.meta["retain"] == D.RETAIN_SIZE
    assert finetune.meta["part"] == "finetune" and pretrain.meta["part"] == "pretrain"
    # no sample (latents and caption together) is in two parts
    rows = {name: {(x.numpy().tobytes(), t.numpy().tobytes()) for x, t in
                   zip(part.latents, part.text, strict=True)}
            for name, part in (("pretrain", pretrain.train), ("finetune", finetune.train),
                               ("val", finetune.val), ("retain", finetune.retain))}
    assert len(rows["finetune"]) == len(finetune.train)  # no repeats inside a part either
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not rows[a] & rows[b], f"{a} and {b} share samples"


def test_retain_comes_from_the_pretraining_world(splits: tuple[D.DataSplit, D.DataSplit]
                                                 ) -> None:
    _, finetune = splits
    assert finetune.retain is not None
    n_words = finetune.retain.mask.sum(1)
    assert int(n_words.max()) <= 8  # no "on paper"
    assert (finetune.val.mask.sum(1) >= 9).all()
    # background pixel level (the latents are space-to-depth of the image: channel 0 is R at
    # even rows/columns): dark for retain, light for the fine-tune
    assert float(finetune.retain.latents[:, :, 0, 0].mean()) < -0.5
    assert float(finetune.val.latents[:, :, 0, 0].mean()) > 0.0


def test_unknown_part_is_a_user_error() -> None:
    with pytest.raises(UserError, match="builtin:shapes has parts pretrain, finetune"):
        D.load_data("builtin:shapes", "everything")


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


def test_demo_base_path_carries_the_version(empty_home: Path) -> None:
    from tune_sana.data.checkpoints import DEMO_BASE_VERSION, demo_base_path, resolve_folder

    assert demo_base_path() == empty_home / f"demo-base-v{DEMO_BASE_VERSION}"
    (empty_home / "demo-base").mkdir(parents=True)  # a base of an older version: not this one
    (empty_home / "demo-base" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="demo base checkpoint is not built yet"):
        resolve_folder("demo-base")
