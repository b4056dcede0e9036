"""Folders a trial reads from the driver's disk, shipped to trials on nodes that cannot see it.

A sweep that joins a Ray cluster (``--address``, or ``ray job submit``) may place its trials on
any node, and a node other than the driver's need not mount the driver's folders. Two settings
name such folders: ``data`` (an encoded folder: ``tune-sana cache`` output, or the one
``sweep.encode_once`` built) and ``model`` when it is a local checkpoint folder or the demo base
(built under the driver's $TUNE_SANA_HOME). Hub ids are fetched by each node itself; ``builtin:``
data and the ``sana-tiny`` preset are made in code.

How they travel: through Ray's object store. :func:`ship` runs on the driver once per sweep
stage: it reads each folder file by file, puts every file's bytes into the object store (owned by
the driver, so a worker node that dies takes no copy with it) and returns a small
:class:`ShippedFolder` per setting value, which reaches the trials as a Tune parameter. In the
trial, :func:`localize` rewrites ``data`` and ``model`` to a copy on the trial's own node,
``$TUNE_SANA_HOME/shipped/<digest>/``, written once per node (atomically: a temp folder renamed
into place) and reused by every later trial and sweep with the same content.

Why the object store and not the storage URI: the run directory may be local to the driver (the
record is written by the driver alone, from rows that reach it through ``tune.report``), so a URI
cannot be assumed; the object store reaches every node of every cluster by construction, needs
no credentials on the workers, and fetches the folder once per node rather than once per trial.
The cost: the folder is held in the driver node's object store while the sweep runs (Ray spills
it to disk beyond the store's size); a model of several GB is better given as a hub id.

Trials on a cluster always read the shipped copy, also on the driver's own node: a trial never
opens a driver path, even where the same path happens to exist on its node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_sana.config import DEMO_BASE, PRESETS, home
from tune_sana.data.checkpoints import demo_base_path, is_local
from tune_sana.data.encoded import BUILTIN_PREFIX
from tune_sana.engine.space import TRIAL_CONFIG_TRIALS, SweepSpec

SHIPPED_DIR = "shipped"  # under each node's $TUNE_SANA_HOME


@dataclass(frozen=True)
class ShippedFolder:
    """A driver folder in Ray's object store: ``files`` pairs each file's path relative to the
    folder with the ObjectRef of its bytes; ``digest`` (sha256 of names and contents) names the
    copy on a node; ``size`` is the bytes of all files."""

    source: str
    digest: str
    files: tuple[tuple[str, Any], ...]
    size: int

    def describe(self) -> str:
        return f"{self.source} ({len(self.files)} files, {self.size / 2**20:.1f} MB)"


# Folders this driver has put, by (Ray job, folder): the search and confirm stages of one sweep
# share them instead of putting them twice.
_PUT: dict[tuple[str, str], ShippedFolder] = {}


def _driver_folder(key: str, value: Any) -> Path | None:
    """The driver folder a ``data`` or ``model`` value reads, or None when it reads none."""
    text = str(value)
    if key == "data":
        return None if text.startswith(BUILTIN_PREFIX) else Path(text).expanduser()
    if text == DEMO_BASE:
        return demo_base_path()
    if text in PRESETS or not is_local(text):
        return None  # made in code, or a hub id each node fetches
    return Path(text).expanduser()


def _put_folder(source: str, folder: Path, say: Callable[[str], None]) -> ShippedFolder:
    import ray

    key = (ray.get_runtime_context().get_job_id(), f"{source}\0{folder.resolve()}")
    if key not in _PUT:
        _PUT[key] = _read_and_put(source, folder)
        say(f"shipping {_PUT[key].describe()} to the trials through Ray's object store")
    return _PUT[key]


def _read_and_put(source: str, folder: Path) -> ShippedFolder:
    import ray

    digest = hashlib.sha256()
    files: list[tuple[str, Any]] = []
    size = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        content = path.read_bytes()  # one file in memory at a time
        digest.update(name.encode() + b"\0" + len(content).to_bytes(8, "little"))
        digest.update(content)
        files.append((name, ray.put(content)))
        size += len(content)
    return ShippedFolder(source, digest.hexdigest()[:32], tuple(files), size)


def ship(spec: SweepSpec, say: Callable[[str], None] = print
         ) -> dict[str, dict[str, ShippedFolder]]:
    """On the driver, after ray.init: every driver folder a trial of ``spec`` can read, put into
    the object store (``say`` tells each one, the first time it is put). Returns {setting:
    {value as the spec names it: ShippedFolder}}; empty for a trial program that takes no
    TrialConfig (it reads no folders of ours)."""
    if spec.trial not in TRIAL_CONFIG_TRIALS:
        return {}
    from tune_sana.engine.preflight import candidates

    shipped: dict[str, dict[str, ShippedFolder]] = {}
    for key in ("data", "model"):
        for value in candidates(spec, key):
            folder = _driver_folder(key, value)
            if folder is not None and folder.is_dir():  # preflight has checked each one
                shipped.setdefault(key, {})[str(value)] = _put_folder(str(value), folder, say)
    return shipped


def localize(values: Mapping[str, Any],
             shipped: Mapping[str, Mapping[str, ShippedFolder]]) -> dict[str, Any]:
    """In the trial: ``values`` with each shipped ``data`` / ``model`` pointed at its copy on
    this node (fetched from the object store the first time this node needs it)."""
    out = dict(values)
    for key, folders in shipped.items():
        folder = folders.get(str(out.get(key)))
        if folder is not None:
            out[key] = str(materialize(folder, home() / SHIPPED_DIR))
    return out


def materialize(folder: ShippedFolder, root: Path) -> Path:
    """The copy of ``folder`` under ``root`` (written there once; concurrent trials on one node
    race safely: the first rename wins, the others drop their temp folder)."""
    target = root / folder.digest
    if target.is_dir():
        return target
    import ray

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.digest}.", dir=root))
    try:
        for name, ref in folder.files:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ray.get(ref))
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another trial's copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
