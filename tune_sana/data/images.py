"""Captioned image sets on disk: listing, checking and loading them for the encoding cache.

Two layouts are read:

- an image folder (searched recursively) where each image ``x.png`` has a sidecar caption
  ``x.txt`` next to it (UTF-8, stripped);
- a manifest, ``.jsonl`` or ``.parquet``, one row per sample with an image path (column ``image``,
  ``image_path`` or ``file_name``; relative paths are relative to the manifest's folder) and a
  caption (``caption``, ``text`` or ``prompt``).

Nothing is dropped silently. Every bad file or row becomes a :class:`Problem` with its name and a
reason from :data:`REASONS`; :meth:`Scan.require_clean` turns them into one UserError with counts
per reason and the first names, unless ``skip_bad`` is set, in which case the caller records them.
Other files in an image folder (not an image, not a caption) are listed in ``Scan.ignored``.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tune_sana.config import UserError

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "file_name")
CAPTION_COLUMNS = ("caption", "text", "prompt")

# Problem reasons, in the order the error message lists them.
UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image"
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
UNREADABLE_CAPTION = "unreadable caption"
ORPHAN_CAPTION = "caption without image"
TOO_SMALL = "too small"
WRONG_SIZE = "wrong size"
BAD_ROW = "bad manifest row"
REASONS = (UNREADABLE_IMAGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, UNREADABLE_CAPTION,
           ORPHAN_CAPTION, TOO_SMALL, WRONG_SIZE, BAD_ROW)
_SHOW = 5  # names shown per reason in an error


class SizePolicy(str, enum.Enum):
    """How an image becomes a ``resolution`` x ``resolution`` square.

    crop: scale the shorter side to the resolution, then center-crop (aspect kept).
    stretch: scale both sides to the resolution (aspect changes).
    exact: the image must already be that size; any other size is a ``wrong size`` problem.
    """

    CROP = "crop"
    STRETCH = "stretch"
    EXACT = "exact"


@dataclass(frozen=True)
class Sample:
    """One image and its caption. ``name`` is the image path relative to the dataset root (or
    ``<manifest>:<line>`` for manifest rows); ``sha256`` is the image file's content hash."""

    name: str
    path: Path
    caption: str
    sha256: str


@dataclass(frozen=True)
class Problem:
    """A file or row that cannot be used, and why (one of REASONS, plus detail)."""

    name: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.reason}{': ' + self.detail if self.detail else ''})"


@dataclass(frozen=True)
class Scan:
    """What a dataset holds: usable samples (in a fixed, sorted order) and the problems found."""

    source: Path
    kind: str  # "folder" or "manifest"
    samples: tuple[Sample, ...]
    problems: tuple[Problem, ...] = ()
    ignored: tuple[str, ...] = ()

    def content_hash(self) -> str:
        """sha256 over every usable sample's name, caption and image bytes, in order."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(json.dumps([sample.name, sample.caption, sample.sha256]).encode())
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        """Problems per reason (only reasons that occur)."""
        found = Counter(p.reason for p in self.problems)
        return {reason: found[reason] for reason in REASONS if found[reason]}

    def summary(self) -> str:
        """One line: '12 samples; 2 bad (1 unreadable image, 1 missing caption); 1 ignored'."""
        text = f"{len(self.samples)} usable samples"
        if self.problems:
            parts = ", ".join(f"{n} {reason}" for reason, n in self.counts().items())
            text += f"; {len(self.problems)} bad ({parts})"
        if self.ignored:
            text += f"; {len(self.ignored)} other files ignored"
        return text

    def require_clean(self, skip_bad: bool) -> None:
        """UserError listing the problems (counts and names) unless there are none or
        ``skip_bad``; also a UserError when no usable sample is left."""
        if self.problems and not skip_bad:
            # One line: the counts, then up to _SHOW names per reason, then the fix.
            parts = [f"data '{self.source}': {self.summary()}"]
            for reason in self.counts():
                bad = [p for p in self.problems if p.reason == reason]
                shown = ", ".join(str(p) for p in bad[:_SHOW])
                more = f", ... {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
                parts.append(f"{reason} x{len(bad)}: {shown}{more}")
            parts.append("fix or remove these files, or leave them out with tune-sana cache "
                         "--skip-bad (they are then listed in the cache's meta.json)")
            raise UserError("; ".join(parts))
        if not self.samples:
            raise UserError(f"data '{self.source}': no usable samples ({self.summary()}); "
                            "a dataset is images with captions (x.png + x.txt) or a manifest")

    def without(self, problems: list[Problem]) -> Scan:
        """This scan with the samples named in ``problems`` moved to the problem list."""
        bad = {p.name for p in problems}
        kept = tuple(s for s in self.samples if s.name not in bad)
        return replace(self, samples=kept, problems=self.problems + tuple(problems))


def scan(source: str | os.PathLike[str]) -> Scan:
    """List a folder or read a manifest; hash every image file. Images are not decoded here
    (see :func:`check_images`). A missing source or unknown file type is a UserError."""
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        return _scan_folder(path)
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return _scan_manifest(path)
    if path.is_file():
        raise UserError(f"data '{source}': a manifest must end in .jsonl or .parquet")
    raise UserError(f"data '{source}': no such folder or manifest file")


def _file_hash(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _scan_folder(root: Path) -> Scan:
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    captions = {p for p in files if p.suffix.lower() == ".txt"}
    used: set[Path] = set()
    samples: list[Sample] = []
    problems: list[Problem] = []
    for image in images:
        name = image.relative_to(root).as_posix()
        caption_file = image.with_suffix(".txt")
        if caption_file not in captions:
            problems.append(Problem(name, MISSING_CAPTION, f"expected {caption_file.name}"))
            continue
        used.add(caption_file)
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem(name, UNREADABLE_CAPTION, type(err).__name__))
            continue
        if not caption:
            problems.append(Problem(name, EMPTY_CAPTION, caption_file.name))
            continue
        sha = _file_hash(image)
        if sha is None:
            problems.append(Problem(name, UNREADABLE_IMAGE, "cannot read the file"))
            continue
        samples.append(Sample(name, image, caption, sha))
    for orphan in sorted(captions - used):
        problems.append(Problem(orphan.relative_to(root).as_posix(), ORPHAN_CAPTION))
    ignored = tuple(p.relative_to(root).as_posix() for p in files
                    if p.suffix.lower() not in IMAGE_EXTENSIONS and p not in captions)
    return Scan(root, "folder", tuple(samples), tuple(problems), ignored)


def _manifest_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) pairs: JSON objects per line, or Parquet rows as dicts."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:
            raise UserError(f"data '{path}': not a readable Parquet file ({err})") from None
        return list(enumerate(table.to_pylist(), start=1))
    rows: list[tuple[int, object]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data '{path}': cannot read the manifest ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((number, f"not JSON ({err.msg})"))
    return rows


def _scan_manifest(path: Path) -> Scan:
    samples: list[Sample] = []
    problems: list[Problem] = []
    for number, row in _manifest_rows(path):
        name = f"{path.name}:{number}"
        if not isinstance(row, dict):
            detail = row if isinstance(row, str) else "not a mapping"
            problems.append(Problem(name, BAD_ROW, detail))
            continue
        image_key = next((k for k in IMAGE_COLUMNS if row.get(k)), None)
        caption_key = next((k for k in CAPTION_COLUMNS if k in row), None)
        if image_key is None or caption_key is None:
            wanted = "/".join(IMAGE_COLUMNS if image_key is None else CAPTION_COLUMNS)
            problems.append(Problem(name, BAD_ROW, f"no {wanted} field"))
            continue
        image = Path(str(row[image_key])).expanduser()
        image = image if image.is_absolute() else path.parent / image
        name = f"{name} {row[image_key]}"
        caption = row[caption_key]
        if not isinstance(caption, str) or not caption.strip():
            problems.append(Problem(name, EMPTY_CAPTION))
            continue
        if not image.is_file():
            problems.append(Problem(name, MISSING_IMAGE, f"no file {image}"))
            continue
        sha = _file_hash(image)
        if sha is None:
            problems.append(Problem(name, UNREADABLE_IMAGE, "cannot read the file"))
            continue
        samples.append(Sample(name, image, caption.strip(), sha))
    return Scan(path, "manifest", tuple(samples), tuple(problems))


# --- decoding --------------------------------------------------------------------------------

def _open_rgb(path: Path) -> Image:
    """The image as an RGB PIL image (EXIF rotation applied, alpha composited on white)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    with PILImage.open(io.BytesIO(path.read_bytes())) as raw:
        raw.load()
        image = ImageOps.exif_transpose(raw)  # a rotated copy, or a plain copy
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _size_problem(name: str, size: tuple[int, int], resolution: int, policy: SizePolicy,
                  allow_upscale: bool) -> Problem | None:
    width, height = size
    if policy is SizePolicy.EXACT:
        if (width, height) != (resolution, resolution):
            return Problem(name, WRONG_SIZE, f"{width}x{height}, need {resolution}x{resolution}")
        return None
    if min(width, height) < resolution and not allow_upscale:  # both policies would upscale
        return Problem(name, TOO_SMALL, f"{width}x{height} < {resolution}px; "
                                        "pass allow_upscale to scale it up")
    return None


def check_images(found: Scan, resolution: int, policy: SizePolicy,
                 allow_upscale: bool = False) -> Scan:
    """Decode every image once and check its size against ``policy``; failures move from the
    samples to the problems (unreadable image, too small, wrong size)."""
    from PIL import UnidentifiedImageError

    problems: list[Problem] = []
    for sample in found.samples:
        try:
            image = _open_rgb(sample.path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            problems.append(Problem(sample.name, UNREADABLE_IMAGE, type(err).__name__))
            continue
        problem = _size_problem(sample.name, image.size, resolution, policy, allow_upscale)
        if problem is not None:
            problems.append(problem)
    return found.without(problems)


def load_image(path: Path, resolution: int, policy: SizePolicy) -> torch.Tensor:
    """A float32 (3, resolution, resolution) tensor in [-1, 1], resized by ``policy``."""
    import numpy as np
    from PIL import Image as PILImage

    image = _open_rgb(path)
    if policy is SizePolicy.STRETCH:
        image = image.resize((resolution, resolution), PILImage.Resampling.BICUBIC)
    elif policy is SizePolicy.CROP:
        width, height = image.size
        scale = resolution / min(width, height)
        new = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if new != image.size:
            image = image.resize(new, PILImage.Resampling.BICUBIC)
        left, top = (new[0] - resolution) // 2, (new[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
