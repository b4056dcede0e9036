"""Ray's storage for a cluster sweep whose run directory is on the driver's disk: a pyarrow
filesystem whose every operation runs in one Ray actor on the driver's node.

Ray Tune (2.7 and later, 2.60 here) does not sync trial files to the head node. Each trial
persists its own checkpoints, from its own node, to ``RunConfig.storage_path`` through pyarrow;
a retried trial downloads its latest checkpoint from there. With a local path on a cluster
without a shared disk that cannot work: Ray checks, at the first checkpoint, for a marker file
the driver wrote into the experiment folder, does not find it on the worker's disk and fails the
trial ("A local path on the head node is not accessible by worker nodes"); and a checkpoint that
did land on a worker's disk would die with that node.

So when a sweep joins a cluster with a local run directory, the driver owns every write:
rows reach it through ``tune.report`` (the recorder writes the Parquet record), and Ray's own
files (checkpoints, experiment state, per-trial logs) go through :func:`storage_filesystem`, a
``pyarrow.fs.PyFileSystem`` whose handler forwards each call to :class:`DiskKeeper`, an actor
pinned to the driver's node that does the file operations there, confined to the run directory.
Trials never open a path of the driver's disk themselves; a checkpoint reaches the driver's
disk before the report that carries it returns, so a worker node that dies loses none.

Files travel in chunks of ``CHUNK`` bytes through the object store; a file is written to a
dot-named temp file beside its target and renamed into place when complete, so nothing reads a
torn checkpoint. Each file costs about 2 ms of round trips besides its bytes (400 small files
in 0.7 s here), and Ray's experiment syncs copy every trial's log files each time. This suits
checkpoints up to a few GB (LoRA adapters, small models) and sweeps of up to some hundreds of
trials; for full fine-tunes of large models give ``--storage`` a URI every node reaches
(``s3://``, ``gs://``) or a shared mount as ``file:///mnt/...``: Ray then writes there from
each node, without the driver in between.
On the embedded single-node Ray and for a URI, Ray's own storage is used (nothing here).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

ACTOR_NAMESPACE = "tune-sana"
CHUNK = 16 * 2**20  # bytes per object-store message, both ways

# (path, type, size, mtime_ns) as the keeper reports a file; type is pyarrow's FileType value.
_Info = tuple[str, int, int | None, int | None]


class DiskKeeper:
    """The file operations of a run directory on the driver's node (a Ray actor: one call at a
    time). Every path must lie inside ``root``; anything else is refused (PermissionError)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._writing: dict[str, tuple[Path, Path]] = {}

    def _inside(self, path: str) -> Path:
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise PermissionError(f"{path}: outside the run directory {self.root}")
        return Path(real)

    @staticmethod
    def _info(shown: str, path: Path) -> _Info:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return shown, int(pafs.FileType.NotFound), None, None
        if path.is_dir():
            return shown, int(pafs.FileType.Directory), None, stat.st_mtime_ns
        return shown, int(pafs.FileType.File), stat.st_size, stat.st_mtime_ns

    def info(self, paths: list[str]) -> list[_Info]:
        return [self._info(p, self._inside(p)) for p in paths]

    def listing(self, base: str, recursive: bool, allow_not_found: bool) -> list[_Info]:
        folder = self._inside(base)
        if not folder.is_dir():
            if folder.exists():
                raise NotADirectoryError(base)
            if allow_not_found:
                return []
            raise FileNotFoundError(base)
        children = folder.rglob("*") if recursive else folder.iterdir()
        shown = base.rstrip("/")
        return [self._info(f"{shown}/{child.relative_to(folder).as_posix()}", child)
                for child in sorted(children) if not _partial(child)]

    def create_dir(self, path: str, recursive: bool) -> None:
        self._inside(path).mkdir(parents=recursive, exist_ok=True)

    def delete_dir(self, path: str) -> None:
        folder = self._inside(path)
        if not folder.is_dir():
            raise FileNotFoundError(path)
        shutil.rmtree(folder)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool) -> None:
        folder = self._inside(path)
        if not folder.is_dir():
            if missing_dir_ok:
                return
            raise FileNotFoundError(path)
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def delete_file(self, path: str) -> None:
        self._inside(path).unlink()

    def move(self, src: str, dest: str) -> None:
        os.replace(self._inside(src), self._inside(dest))

    def copy_file(self, src: str, dest: str) -> None:
        shutil.copyfile(self._inside(src), self._inside(dest))

    def read(self, path: str, offset: int, size: int) -> bytes:
        with open(self._inside(path), "rb") as file:
            file.seek(offset)
            return file.read(size)

    def size(self, path: str) -> int:
        file = self._inside(path)
        if not file.is_file():
            raise FileNotFoundError(path)
        return file.stat().st_size

    def put(self, path: str, data: bytes) -> None:
        """The whole file in one call (a small file)."""
        token = self.begin(path)
        self.append(token, data)
        self.commit(token)

    def begin(self, path: str) -> str:
        target = self._inside(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        temp = target.with_name(f".{target.name}.{token[:8]}.part")
        temp.write_bytes(b"")
        self._writing[token] = (temp, target)
        return token

    def append(self, token: str, data: bytes) -> None:
        with open(self._writing[token][0], "ab") as file:
            file.write(data)

    def commit(self, token: str) -> None:
        temp, target = self._writing.pop(token)
        os.replace(temp, target)

    def ping(self) -> str:
        return self.root


def _partial(path: Path) -> bool:
    """A file still being written (begin ... commit): never listed."""
    return path.name.startswith(".") and path.name.endswith(".part")


def _actor_name(root: str, node: str) -> str:
    """One keeper per run directory on one node (the same path on two drivers' disks is two
    folders)."""
    key = f"{node}:{os.path.realpath(root)}"
    return "tune-sana-disk-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _call(method: Any, *args: Any) -> Any:
    """Call a keeper method and wait; its exception comes back as itself (FileNotFoundError
    stays FileNotFoundError for pyarrow), not wrapped in Ray's."""
    import ray

    try:
        return ray.get(method.remote(*args))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None


class DriverDiskHandler(pafs.FileSystemHandler):
    """pyarrow's side of the driver's disk: each operation one call to the DiskKeeper of the
    run directory ``root`` on the driver's node ``node`` (a Ray node id), found by name.
    Picklable: Ray ships it to every trial inside its storage context."""

    def __init__(self, root: str, node: str) -> None:
        self.root, self.node = os.path.realpath(root), node
        self._keeper: Any = None

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return DriverDiskHandler, (self.root, self.node)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DriverDiskHandler)
                and (other.root, other.node) == (self.root, self.node))

    def __hash__(self) -> int:
        return hash((self.root, self.node))

    @property
    def keeper(self) -> Any:
        if self._keeper is None:
            import ray

            self._keeper = ray.get_actor(_actor_name(self.root, self.node),
                                         namespace=ACTOR_NAMESPACE)
        return self._keeper

    def get_type_name(self) -> str:
        return "tune-sana-driver-disk"

    def normalize_path(self, path: str) -> str:
        return path

    @staticmethod
    def _file_infos(infos: Iterable[_Info]) -> list[pafs.FileInfo]:
        return [pafs.FileInfo(path, pafs.FileType(kind), size=size, mtime_ns=mtime)
                for path, kind, size, mtime in infos]

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._file_infos(_call(self.keeper.info, list(paths)))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._file_infos(_call(self.keeper.listing, selector.base_dir, selector.recursive,
                                      selector.allow_not_found))

    def create_dir(self, path: str, recursive: bool) -> None:
        _call(self.keeper.create_dir, path, recursive)

    def delete_dir(self, path: str) -> None:
        _call(self.keeper.delete_dir, path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if not path.strip("/"):
            raise ValueError(f"delete_dir_contents of '{path}': not the root")
        _call(self.keeper.delete_dir_contents, path, missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("the driver's disk: deleting its root is not allowed")

    def delete_file(self, path: str) -> None:
        _call(self.keeper.delete_file, path)

    def move(self, src: str, dest: str) -> None:
        _call(self.keeper.move, src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        _call(self.keeper.copy_file, src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_Reader(self.keeper, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_Reader(self.keeper, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_Writer(self.keeper, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        raise NotImplementedError("the driver's disk: appending is not supported")


class _Reader(io.RawIOBase):
    """A file on the driver's disk, read in chunks as asked."""

    def __init__(self, keeper: Any, path: str) -> None:
        super().__init__()
        self._keeper, self._path = keeper, path
        self._size = int(_call(keeper.size, path))
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, start + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), CHUNK, max(0, self._size - self._pos))
        if want == 0:
            return 0
        data = _call(self._keeper.read, self._path, self._pos, want)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


class _Writer(io.RawIOBase):
    """A file written to the driver's disk: buffered, sent in chunks, renamed into place on
    close (a small file goes in one call)."""

    def __init__(self, keeper: Any, path: str) -> None:
        super().__init__()
        self._keeper, self._path = keeper, path
        self._buffer = bytearray()
        self._token: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._buffer += chunk
        while len(self._buffer) >= CHUNK:
            self._send(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]
        return len(chunk)

    def _send(self, data: bytes) -> None:
        if self._token is None:
            self._token = str(_call(self._keeper.begin, self._path))
        _call(self._keeper.append, self._token, data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._token is None:
                _call(self._keeper.put, self._path, bytes(self._buffer))
            else:
                if self._buffer:
                    self._send(bytes(self._buffer))
                _call(self._keeper.commit, self._token)
        finally:
            self._buffer = bytearray()
            super().close()


# The keepers this driver started, by (Ray job, run directory): a named actor lives while the
# handle that created it does, so the driver holds that one for as long as it runs (the actor
# ends with the driver's job).
_KEEPERS: dict[tuple[str, str], Any] = {}


def start_keeper(run_dir: str | os.PathLike[str]) -> str:
    """Start the run's DiskKeeper on this (the driver's) node, or find it running; returns
    the node's id."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = os.path.realpath(run_dir)
    here = ray.get_runtime_context().get_node_id()
    key = (ray.get_runtime_context().get_job_id(), root)
    if key in _KEEPERS:  # its first handle owns it: a handle found by name would not
        return here
    Path(root).mkdir(parents=True, exist_ok=True)
    actor: Any = ray.remote(DiskKeeper)
    keeper = actor.options(
        name=_actor_name(root, here), namespace=ACTOR_NAMESPACE, get_if_exists=True, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(root)
    ray.get(keeper.ping.remote())
    _KEEPERS[key] = keeper
    return here


def storage_filesystem(run_dir: str | os.PathLike[str]) -> pafs.FileSystem:
    """The driver's disk as Ray's storage filesystem for ``run_dir`` (a local folder), its
    keeper started here. Ray's storage path is then the plain local path."""
    node = start_keeper(run_dir)
    return pafs.PyFileSystem(DriverDiskHandler(os.fspath(run_dir), node))
