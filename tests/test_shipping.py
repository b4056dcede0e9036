"""What a trial on another node reads and writes through the driver, on a local Ray: folders
shipped through the object store (engine/shipping.py) and the driver's disk as Ray's storage
filesystem (engine/driverfs.py), also as Ray's own checkpoint code uses it. The two-node sweep
that needs both is tests/test_multinode.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tune_sana.engine import driverfs, shipping
from tune_sana.engine.space import parse_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose DiskKeeper is started once for the module."""
    return tmp_path_factory.mktemp("driverfs") / "run"


@pytest.fixture
def disk(run: Path) -> pafs.FileSystem:
    return driverfs.storage_filesystem(run)  # the running keeper, found by name


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)  # 10 KB: several chunks below
    return src


def test_a_folder_goes_up_and_comes_back_in_chunks(
        disk: pafs.FileSystem, run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driverfs, "CHUNK", 1000)
    src = _tree(tmp_path)
    pafs.copy_files(str(src), str(run / "ckpt"), destination_filesystem=disk)
    assert (run / "ckpt" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    listed = disk.get_file_info(pafs.FileSelector(str(run / "ckpt"), recursive=True))
    assert sorted(Path(i.path).relative_to(run / "ckpt").as_posix() for i in listed) == [
        "a.txt", "sub", "sub/b.bin"]
    pafs.copy_files(str(run / "ckpt"), str(tmp_path / "down"), source_filesystem=disk)
    assert (tmp_path / "down" / "sub" / "b.bin").read_bytes() == (
        src / "sub" / "b.bin").read_bytes()
    disk.delete_dir(str(run / "ckpt"))
    assert not (run / "ckpt").exists()


def test_a_file_appears_whole_when_closed_never_torn(
        disk: pafs.FileSystem, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driverfs, "CHUNK", 100)
    target = run / "whole" / "state.pt"
    stream = disk.open_output_stream(str(target))
    stream.write(b"x" * 250)  # two chunks sent, the rest buffered
    assert not target.exists()
    assert disk.get_file_info(pafs.FileSelector(str(target.parent))) == []  # temp file unlisted
    stream.close()
    assert target.read_bytes() == b"x" * 250
    assert [p.name for p in target.parent.iterdir()] == ["state.pt"]


def test_paths_outside_the_run_are_refused_and_missing_files_are_not_found(
        disk: pafs.FileSystem, run: Path) -> None:
    (run.parent / "secret").write_text("driver only")
    with pytest.raises(PermissionError, match="outside the run directory"):
        disk.open_input_stream(str(run.parent / "secret"))
    with pytest.raises(PermissionError):
        disk.get_file_info(str(run / ".." / "secret"))
    with pytest.raises(FileNotFoundError):
        disk.open_input_stream(str(run / "nope"))
    info = disk.get_file_info(str(run / "nope"))
    assert info.type == pafs.FileType.NotFound


def test_rays_checkpoint_code_persists_to_and_restores_from_the_driver(
        disk: pafs.FileSystem, run: Path, tmp_path: Path) -> None:
    """What a trial on another node does with it: Ray's StorageContext (unpickled there, the
    filesystem with it) persists a checkpoint and a retry downloads it."""
    from ray.train import Checkpoint
    from ray.train._internal.storage import StorageContext

    storage = StorageContext(str(run.parent), run.name, storage_filesystem=disk,
                             trial_dir_name="t1")
    storage = pickle.loads(pickle.dumps(storage))
    storage.current_checkpoint_index = 0
    persisted = storage.persist_current_checkpoint(Checkpoint.from_directory(str(_tree(tmp_path))))
    assert (run / "t1" / "checkpoint_000000" / "a.txt").read_text() == "hello"
    restored = Path(persisted.to_directory(str(tmp_path / "restored")))
    assert (restored / "sub" / "b.bin").read_bytes() == (tmp_path / "src/sub/b.bin").read_bytes()


def test_shipped_folders_are_copied_once_per_node_and_replace_only_their_value(
        local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _tree(tmp_path)
    spec = parse_spec({"trial": "sana_finetune", "search": {"algorithm": "grid"},
                       "fixed": {"model": "sana-tiny", "data": str(data)},
                       "space": {"lr": {"grid": [1e-3]}}}, "test")
    said: list[str] = []
    shipped = shipping.ship(spec, say=said.append)
    assert list(shipped) == ["data"]  # sana-tiny is made in code: nothing to ship
    assert len(said) == 1 and said[0].startswith(f"shipping {data} (2 files")
    assert shipping.ship(spec, say=said.append) == shipped and len(said) == 1  # put once

    monkeypatch.setenv("TUNE_SANA_HOME", str(tmp_path / "node"))
    values = shipping.localize({"data": str(data), "model": "sana-tiny", "lr": 1e-3}, shipped)
    copy = Path(values["data"])
    assert copy.parent == tmp_path / "node" / shipping.SHIPPED_DIR
    assert (copy / "sub" / "b.bin").read_bytes() == (data / "sub" / "b.bin").read_bytes()
    assert values["model"] == "sana-tiny" and values["lr"] == 1e-3
    (copy / "a.txt").write_text("a later trial on this node finds the copy in place")
    again = shipping.localize({"data": str(data)}, shipped)
    assert Path(again["data"]) == copy and (copy / "a.txt").read_text().startswith("a later")
    assert shipping.localize({"data": "builtin:shapes"}, shipped) == {"data": "builtin:shapes"}
