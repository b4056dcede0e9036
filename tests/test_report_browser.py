"""The HTML report in a real browser: headless Chromium renders ``tune-sana report --html`` and
the screenshot must hold each sample grid (the base's and every top trial's) and each trial's
curve, pixel for pixel. The same page with its images taken out must not pass the same check.

Chromium comes from Debian's packages (scripts/test.sh installs chromium-headless-shell when it
is missing); without one the test skips and says so.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tune_sana.analysis.report import report
from tune_sana.engine.samples import path_of
from tune_sana.outcomes import BASE_SAMPLES

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
WINDOW = (1400, 4000)  # tall enough for the tables and the gallery of a 3-trial run


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (looked for " + ", ".join(BROWSERS) + "); "
                "scripts/test.sh installs Debian's chromium-headless-shell as root")


def screenshot(page: Path, out: Path) -> np.ndarray:
    """The page as headless Chromium draws it: (height, width, 3) uint8 RGB, one CSS pixel
    per screen pixel, sRGB (no colour management that would move a pixel's value)."""
    from PIL import Image

    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    "--force-color-profile=srgb", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    f"--screenshot={out}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB"))


def find(shot: np.ndarray, png: bytes | Path, scale: int) -> tuple[int, int] | None:
    """Where ``png``, enlarged ``scale`` times (nearest: as the page's pixelated grid), sits
    in ``shot`` exactly: (top, left), or None. Rows are matched as byte strings, then the block."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    want = np.asarray(image.resize((image.width * scale, image.height * scale),
                                   Image.Resampling.NEAREST))
    h, w = want.shape[:2]
    middle = want[h // 2].tobytes()
    for y in range(h // 2, shot.shape[0] - (h - h // 2) + 1):
        line = shot[y].tobytes()
        at = line.find(middle)
        while at >= 0:
            x = at // 3
            if at % 3 == 0 and np.array_equal(shot[y - h // 2:y - h // 2 + h, x:x + w], want):
                return y - h // 2, x
            at = line.find(middle, at + 1)
    return None


def test_chromium_shows_each_grid_beside_its_curve(tmp_path: Path, sample_run: Path) -> None:
    run_dir = sample_run
    page = tmp_path / "report.html"
    report([str(run_dir)], html_file=page)
    html = page.read_text()
    shot = screenshot(page, tmp_path / "shot.png")

    grids = {name: Path(path_of(run_dir, name).path) for name in (BASE_SAMPLES, "good", "slow")}
    where = {name: find(shot, file, scale=2) for name, file in grids.items()}  # img.grid: 2x
    assert all(where.values()), where
    tops = [where[name][0] for name in (BASE_SAMPLES, "good", "slow")]  # type: ignore[index]
    assert tops == sorted(tops)  # the base first, then the trials best first
    assert not path_of(run_dir, "bad").exists()  # a diverged trial has no grid

    # each trial's curve (its own PNG inside the page) sits on the same row, left of its grid
    curves = re.findall(r"<img class=curve alt='(\w+) curve' src='data:image/png;base64,"
                        r"([^']+)'", html)
    assert [name for name, _ in curves] == ["good", "slow"]
    for name, data in curves:
        curve_png = tmp_path / f"{name}_curve.png"
        curve_png.write_bytes(base64.b64decode(data))
        at = find(shot, curve_png, scale=1)
        grid_at = where[name]
        assert at is not None and grid_at is not None, name
        assert at[1] < grid_at[1] and abs(at[0] - grid_at[0]) < 200, (at, grid_at)

    # the check has teeth: the same page without its pictures finds none of them
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r"data:image/png;base64,[^']+", "", html))
    empty = screenshot(blank, tmp_path / "blank.png")
    assert not any(find(empty, file, scale=2) for file in grids.values())
