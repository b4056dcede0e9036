"""A run name is a name: ``--name`` (and the space file's name, which makes the default run name)
becomes one folder under --storage and never a way out of it, on a local folder and on a URI
(where '%2e%2e' would be decoded to '..'). A bad one is one line, exit 2, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.engine.sweep import SweepOptions, run_dir_for
from tune_sana.record.storage import Location

BAD = {
    "parent": "..", "here": ".", "empty": "", "climbs out": "../escape",
    "deep climb": "../../../tmp/escape", "absolute": "/tmp/escape", "nested": "a/b",
    "backslash": "a\\..\\b", "hidden": ".hidden", "encoded parent": "%2e%2e",
    "encoded slash": "a%2Fb", "fragment": "x#y", "query": "x?y", "tab": "a\tb",
    "newline": "a\nb", "nul": "a\x00b", "too long": "x" * 256,
}
GOOD = ["lr-sweep_2", "run.v2", "a+b=c@d", "2026-11-29"]
ON_A_URI = {"space": "a b"}  # fine as a local folder; a URI cannot hold it
SPACE = "trial: synthetic\nfixed: {steps: 3}\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"


def _storage(tmp_path: Path, kind: str) -> str:
    folder = tmp_path / "runs"
    return str(folder) if kind == "local" else folder.as_uri()


@pytest.mark.parametrize("kind", ["local", "uri"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_name_that_is_not_one_folder_is_refused_before_anything_is_made(
        tmp_path: Path, kind: str, case: str) -> None:
    with pytest.raises(UserError) as caught:
        run_dir_for("space", SweepOptions(name=BAD[case], storage=_storage(tmp_path, kind)))
    message = str(caught.value)
    assert message.startswith(f"--name {BAD[case]!r}: a run name must be one folder name")
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # not even the storage folder


def test_a_space_is_refused_only_on_a_uri(tmp_path: Path) -> None:
    for name in ON_A_URI.values():
        with pytest.raises(UserError, match="or spaces on a URI"):
            run_dir_for("space", SweepOptions(name=name, storage=_storage(tmp_path, "uri")))
        run = run_dir_for("space", SweepOptions(name=name, storage=_storage(tmp_path, "local")))
        assert run == tmp_path / "runs" / name


@pytest.mark.parametrize("kind", ["local", "uri"])
@pytest.mark.parametrize("name", GOOD)
def test_a_plain_name_is_one_folder_inside_the_storage(tmp_path: Path, kind: str,
                                                       name: str) -> None:
    run = Location.of(run_dir_for("space", SweepOptions(name=name,
                                                        storage=_storage(tmp_path, kind))))
    assert run.name == name
    assert Path(run.path).parent == tmp_path / "runs"


@pytest.mark.parametrize("kind", ["local", "uri"])
@pytest.mark.parametrize("name", ["../escape", "%2e%2e", "..", ""])
def test_the_cli_refuses_a_traversal_in_one_line_and_writes_nothing(
        tmp_path: Path, kind: str, name: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(space), "--storage", _storage(tmp_path, kind), "--name", name])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tune-sana: error: --name") and "\n" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["space.yaml"]


def test_a_space_file_name_that_is_no_run_name_says_so(tmp_path: Path) -> None:
    """The default run name is <space file name>-<time>: a '#' in it would cut a URI short."""
    with pytest.raises(UserError, match="the space file's name 'lr#2'"):
        run_dir_for("lr#2", SweepOptions(storage=_storage(tmp_path, "uri")))
    assert list(tmp_path.iterdir()) == []
