"""Image folders and manifests: listing, bad files reported by name and count, image loading."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tune_sana.config import UserError
from tune_sana.data.images import (
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    ORPHAN_CAPTION,
    TOO_SMALL,
    UNREADABLE_IMAGE,
    WRONG_SIZE,
    SizePolicy,
    check_images,
    load_image,
    scan,
)
from tune_sana.testing.tiny_sana import write_images


def test_folder_pairs_images_with_sidecar_captions_in_sorted_order(tmp_path: Path) -> None:
    captions = write_images(tmp_path / "set" / "sub", 3)
    (tmp_path / "set" / "README.md").write_text("notes")
    write_images(tmp_path / "set" / ".thumbnails", 1)  # hidden folders are not part of the set
    found = scan(tmp_path / "set")
    assert [s.name for s in found.samples] == [f"sub/img{i:03d}.png" for i in range(3)]
    assert [s.caption for s in found.samples] == captions
    assert found.problems == () and found.ignored == ("README.md",)


def test_content_hash_follows_captions_and_pixels_not_the_folder_name(tmp_path: Path) -> None:
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 2)
    assert scan(tmp_path / "a").content_hash() == scan(tmp_path / "b").content_hash()
    (tmp_path / "b" / "img001.txt").write_text("item one")
    assert scan(tmp_path / "a").content_hash() != scan(tmp_path / "b").content_hash()


def test_bad_files_are_listed_by_name_with_counts(tmp_path: Path) -> None:
    write_images(tmp_path, 4)
    (tmp_path / "img000.txt").unlink()  # missing caption
    (tmp_path / "img001.txt").write_text("   \n")  # empty caption
    (tmp_path / "stray.txt").write_text("a caption with no image")
    found = scan(tmp_path)
    assert found.counts() == {MISSING_CAPTION: 1, EMPTY_CAPTION: 1, ORPHAN_CAPTION: 1}
    assert [s.name for s in found.samples] == ["img002.png", "img003.png"]
    with pytest.raises(UserError) as err:
        found.require_clean(skip_bad=False)
    message = str(err.value)
    assert "2 usable samples; 3 bad" in message
    for expected in ("missing caption x1: img000.png", "empty caption x1: img001.png",
                     "caption without image x1: stray.txt", "--skip-bad"):
        assert expected in message
    found.require_clean(skip_bad=True)  # the caller records the problems instead


def test_unreadable_and_wrong_size_images_are_found_when_decoded(tmp_path: Path) -> None:
    write_images(tmp_path, 3, size=16)
    write_images(tmp_path / "big", 1, size=24)
    (tmp_path / "img000.png").write_bytes(b"not a png at all")
    found = scan(tmp_path)
    assert len(found.samples) == 4  # listing reads bytes, it does not decode

    exact = check_images(found, 16, SizePolicy.EXACT)
    assert exact.counts() == {UNREADABLE_IMAGE: 1, WRONG_SIZE: 1}
    assert {str(p) for p in exact.problems} >= {"big/img000.png (wrong size: 24x24, need 16x16)"}
    assert len(exact.samples) == 2

    crop = check_images(found, 20, SizePolicy.CROP)
    assert crop.counts() == {UNREADABLE_IMAGE: 1, TOO_SMALL: 2}
    assert len(check_images(found, 20, SizePolicy.CROP, allow_upscale=True).samples) == 3


def test_no_usable_sample_is_an_error_even_with_skip_bad(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    (tmp_path / "img000.txt").unlink()
    with pytest.raises(UserError, match="no usable samples"):
        scan(tmp_path).require_clean(skip_bad=True)


def test_jsonl_manifest_resolves_paths_and_reports_bad_rows(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 2)
    lines = [
        json.dumps({"image": "images/img000.png", "caption": "first"}),
        json.dumps({"file_name": str(tmp_path / "images" / "img001.png"), "text": "second"}),
        "{not json",
        json.dumps({"image": "images/gone.png", "caption": "x"}),
        json.dumps({"caption": "no image field"}),
        "",
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines))
    found = scan(manifest)
    assert [s.caption for s in found.samples] == ["first", "second"]
    assert found.kind == "manifest"
    names = [p.name for p in found.problems]
    assert names[0] == "train.jsonl:3" and names[1].startswith("train.jsonl:4 images/gone.png")
    assert found.counts() == {MISSING_IMAGE: 1, "bad manifest row": 2}


def test_parquet_manifest(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    table = pa.table({"image": ["img000.png", "img001.png"], "caption": ["a", ""]})
    pq.write_table(table, tmp_path / "m.parquet")
    found = scan(tmp_path / "m.parquet")
    assert [s.caption for s in found.samples] == ["a"]
    assert found.counts() == {EMPTY_CAPTION: 1}


def test_unknown_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder or manifest"):
        scan(tmp_path / "missing")
    (tmp_path / "list.csv").write_text("image,caption\n")
    with pytest.raises(UserError, match=".jsonl or .parquet"):
        scan(tmp_path / "list.csv")


def test_load_image_crops_the_center_and_scales_to_minus_one_one(tmp_path: Path) -> None:
    from PIL import Image

    pixels = torch.zeros(8, 16, 3, dtype=torch.uint8)
    pixels[:, 4:12] = 255  # a white band in the middle of a wide image
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    crop = load_image(tmp_path / "wide.png", 8, SizePolicy.CROP)
    assert crop.shape == (3, 8, 8) and crop.dtype == torch.float32
    assert torch.allclose(crop, torch.ones_like(crop))  # only the white center survives
    stretch = load_image(tmp_path / "wide.png", 8, SizePolicy.STRETCH)
    assert stretch.min() < -0.9 and stretch.max() > 0.9
