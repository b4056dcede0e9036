"""Where a run lives: a local folder or a URI that pyarrow understands (``file://``, ``s3://``,
``gs://``, ``hdfs://``, ...), resolved with ``pyarrow.fs.FileSystem.from_uri``.

A :class:`Location` is a folder or file on one filesystem, with the few operations the sweep's
record needs: exists, list, read, atomic write, delete. Local paths behave exactly as plain
``pathlib`` code did: a temp file with a leading dot in the same folder, renamed into place
(``os.replace``). On a URI the temp file (same dot-name rule) is written with the filesystem and
moved into place (``fs.move``: a rename on a local or HDFS filesystem; on an object store a copy,
and the final put is what readers see). Readers and pyarrow datasets never list dot-named files.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tune_sana.config import UserError

# Fault injection for the disk-full tests: from the Nth Parquet write of this process on, every
# one fails with OSError(ENOSPC) as on a full disk (after part of its temp file is written, which
# is removed). Unset in normal use.
ENOSPC_ENV = "TUNE_SANA_FAULT_ENOSPC_AT_WRITE"
_table_writes = [0]


def _maybe_disk_full() -> None:
    target = os.environ.get(ENOSPC_ENV)
    if target:
        _table_writes[0] += 1
        if _table_writes[0] >= int(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class WriteFailed(OSError):
    """An atomic write that failed (a full disk, a lost mount, no permission): ``filename`` is
    the file it was writing; ``errno`` and ``strerror`` are the cause's (errno may be None when
    pyarrow gave none). Nothing of it is visible: its temp file is removed."""


def one_line(err: BaseException) -> str:
    """An error's message for a one-line UserError: its first line (pyarrow's filesystem
    errors can run over many: HDFS's 'Unable to load libjvm' lists every path it tried)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def is_uri(location: str | os.PathLike[str]) -> bool:
    """A URI (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location


@dataclass(frozen=True)
class Location:
    """A folder or file: ``text`` as the user (or Ray) names it, ``fs`` and ``path`` on it."""

    text: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, location: str | os.PathLike[str] | Location) -> Location:
        if isinstance(location, Location):
            return location
        if not is_uri(location):
            text = os.fspath(location)
            return cls(text, pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
        text = str(location).rstrip("/") if not str(location).endswith(":///") else str(location)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as err:
            raise UserError(f"{text}: not a storage URI that pyarrow understands "
                            f"({one_line(err)}); use a local folder or e.g. file:///..., "
                            "s3://bucket/path") from None
        return cls(text, fs, path)

    # --- naming ---------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return not is_uri(self.text)

    @property
    def name(self) -> str:
        if self.is_local:
            return Path(self.text).name
        return posixpath.basename(urlsplit(self.text).path.rstrip("/"))

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(str(Path(self.text).parent), self.fs, posixpath.dirname(self.path))
        parts = urlsplit(self.text)
        up = posixpath.dirname(parts.path.rstrip("/"))
        return Location(urlunsplit(parts._replace(path=up)), self.fs,
                        posixpath.dirname(self.path.rstrip("/")))

    def __truediv__(self, name: str) -> Location:
        if self.is_local:
            return Location(str(Path(self.text) / name), self.fs, os.path.join(self.path, name))
        parts = urlsplit(self.text)
        joined = parts.path.rstrip("/") + "/" + name
        return Location(urlunsplit(parts._replace(path=joined)), self.fs,
                        self.path.rstrip("/") + "/" + name)

    def __str__(self) -> str:
        return self.text

    def public(self) -> Path | str:
        """What public functions return: a Path for a local folder, the URI string otherwise."""
        return Path(self.text) if self.is_local else self.text

    # --- queries --------------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        return bool(self._info().type == pafs.FileType.Directory)

    def mtime(self) -> float | None:
        """Modification time in seconds (None where the filesystem has none, e.g. an object
        store's folder)."""
        info = self._info()
        return info.mtime.timestamp() if info.mtime is not None else None

    def entries(self, prefix: str = "", suffix: str = "", dirs: bool | None = None,
                hidden: bool = False) -> list[Location]:
        """Direct children whose names start with ``prefix`` and end with ``suffix``, sorted by
        name; dot-named ones (temp files) only with ``hidden``; ``dirs`` True/False keeps only
        folders/files. An absent folder has none."""
        if not self.is_dir():
            return []
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            name = info.base_name
            if name.startswith(".") and not hidden:
                continue
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            if dirs is not None and (info.type == pafs.FileType.Directory) != dirs:
                continue
            out.append(self / name)
        return sorted(out, key=lambda loc: loc.name)

    # --- reading and writing --------------------------------------------------------------------

    def create_dir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_text(self) -> str:
        if self.is_local:
            return Path(self.path).read_text()
        with self.fs.open_input_stream(self.path) as stream:
            data: bytes = stream.read()
        return data.decode()

    def move(self, target: Location) -> None:
        """Move this file to ``target`` on the same filesystem (its folder created): a rename
        on a local or HDFS filesystem, a copy and delete on an object store."""
        target.parent.create_dir()
        self.fs.move(self.path, target.path)

    def delete(self) -> None:
        """Delete a file; an absent one is fine."""
        if self.is_local:
            Path(self.path).unlink(missing_ok=True)
        elif self.is_file():
            self.fs.delete_file(self.path)

    def _write_atomic(self, write: Callable[[str, pafs.FileSystem | None], None],
                      before_commit: Callable[[], None] | None) -> None:
        if self.is_local:
            folder = Path(self.path).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            try:
                write(tmp, None)
                if before_commit is not None:
                    before_commit()
                os.replace(tmp, self.path)
            except BaseException as err:
                Path(tmp).unlink(missing_ok=True)
                self._raise_failed(err)
                raise
            return
        parent = self.parent
        parent.create_dir()
        tmp = f"{parent.path.rstrip('/')}/.{self.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            write(tmp, self.fs)
            if before_commit is not None:
                before_commit()
            self.fs.move(tmp, self.path)
        except BaseException as err:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            self._raise_failed(err)
            raise

    def _raise_failed(self, err: BaseException) -> None:
        """An OSError of a write as :class:`WriteFailed` naming this file (other errors, and
        one that already names it, go on as they are)."""
        if isinstance(err, OSError) and not isinstance(err, WriteFailed):
            code = err.errno if err.errno is not None else _errno_in(str(err))
            raise WriteFailed(code, err.strerror or one_line(err), self.text) from err

    def write_text_atomic(self, text: str,
                          before_commit: Callable[[], None] | None = None) -> None:
        """Write ``text`` via a dot-named temp file in the same folder, then move it into place."""
        def write(tmp: str, fs: pafs.FileSystem | None) -> None:
            if fs is None:
                Path(tmp).write_text(text)
            else:
                with fs.open_output_stream(tmp) as stream:
                    stream.write(text.encode())

        self._write_atomic(write, before_commit)

    def write_table_atomic(self, table: pa.Table,
                           before_commit: Callable[[], None] | None = None) -> None:
        """Write ``table`` as Parquet via a dot-named temp file, then move it into place;
        ``before_commit`` runs between the two (the crash tests' fault hook)."""
        def write(tmp: str, fs: pafs.FileSystem | None) -> None:
            pq.write_table(table, tmp, filesystem=fs)
            _maybe_disk_full()

        self._write_atomic(write, before_commit)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        if self.is_local:
            return pq.read_table(self.path, columns=columns)
        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def read_schema(self) -> pa.Schema:
        if self.is_local:
            return pq.read_schema(self.path)
        return pq.read_schema(self.path, filesystem=self.fs)


def _errno_in(message: str) -> int | None:
    """The errno pyarrow names in an error's text ('[errno 28] No space left on device'), as
    its OSError may come without one."""
    found = re.search(r"\[errno (\d+)\]", message, re.IGNORECASE)
    return int(found.group(1)) if found else None
