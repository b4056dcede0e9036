"""Build and run the sweep: a ray.tune.Tuner over a trial program, locally or on a cluster.

The trial program never imports Ray: ``_trainable`` (run inside each Tune trial) validates the
config, hands the trial a ``report`` that cleans every row (NaN never reaches Ray) and relays it
to ``ray.tune.report`` in batches (relay.py). The driver owns the Parquet record
(``recorder.ResultsRecorder``). With ``search.confirm`` a second Tuner follows the search: the
confirm stage (confirm.py), recorded into the same run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tune_sana.config import TrialConfig, UserError, build_config
from tune_sana.engine import preflight, relay
from tune_sana.engine.space import TRAINER_CPU, TRIAL_CONFIG_TRIALS, SweepSpec, max_t
from tune_sana.engine.trialrun import load_trial, run_relayed
from tune_sana.record.readers import read_spec
from tune_sana.record.schema import SPEC_FILE
from tune_sana.record.storage import Location, is_uri, one_line

DEFAULT_STORAGE = "runs"  # where runs go: a folder (relative to the working directory) or a URI
PROGRESS_EVERY_S = 10.0  # seconds between the driver's progress lines (--progress-every)


@dataclass(frozen=True)
class SweepOptions:
    """How and where to run a spec (everything that is not the search space itself)."""

    name: str | None = None
    storage: str = DEFAULT_STORAGE
    address: str | None = None
    resume: bool = False
    num_cpus: int | None = None
    num_gpus: int | None = None
    dashboard: bool = False
    progress_every_s: float = PROGRESS_EVERY_S
    report_every_s: float = relay.EVERY_S
    connect_timeout_s: float = 30.0
    warm_start: tuple[str, ...] = ()  # earlier runs whose trials seed the searcher
    track: tuple[str, ...] = ()  # trackers fed every step row (engine/trackers.py)


def _trainable(config: dict[str, Any], *, fixed: dict[str, Any], trial: str, cpus: float,
               metric: str, report_every_s: float, shipped: dict[str, Any] | None = None,
               workers: dict[str, Any] | None = None) -> None:
    """Runs in a Tune trial: one trial program call, its rows relayed to Ray in batches.
    ``shipped``: driver folders sent through the object store (engine/shipping.py).
    ``workers``: a multi-worker trial's Ray Train settings (engine/workers.py)."""
    import ray
    from ray import tune

    values = {**fixed, **config}
    if workers:  # each worker localizes shipped folders on its own node
        from tune_sana.engine.workers import run_workers

        run_workers(values, trial=trial, metric=metric, shipped=shipped, **workers)
        return
    if shipped:
        from tune_sana.engine.shipping import localize

        values = localize(values, shipped)  # data and model: copies on this trial's node
    node = ray.get_runtime_context().get_node_id()  # trials.parquet's node column
    if trial in TRIAL_CONFIG_TRIALS:
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # a trial's CPU share, not the whole node
    run = load_trial(trial)

    def send(result: dict[str, Any], checkpoint: Any) -> None:
        tune.report({**result, "node": node}, checkpoint=checkpoint)

    checkpointer = _RayCheckpointer()

    def call(report: Callable[[dict[str, Any]], None]) -> None:
        if trial in TRIAL_CONFIG_TRIALS:
            run(build_config(values, "trial config"), report, checkpoint=checkpointer)
        else:
            run(values, report)

    run_relayed(call, relay.RowRelay(send, metric, every_s=report_every_s), checkpointer)


class _RayCheckpointer:
    """The trial's checkpoints as Ray Tune checkpoints: restored after a retry, saved with the
    next report (so no extra training iteration is reported)."""

    def __init__(self) -> None:
        self._pending: Any = None

    def restore(self) -> Path | None:
        from ray import tune

        found = tune.get_checkpoint()
        return Path(found.to_directory()) if found is not None else None

    def save(self, write: Callable[[Path], None]) -> None:
        from ray.tune import Checkpoint

        folder = Path(tempfile.mkdtemp(prefix="tune-sana-ckpt-"))
        write(folder)
        self._pending = Checkpoint.from_directory(str(folder))

    def take(self) -> Any:
        pending, self._pending = self._pending, None
        return pending


# --- paths ----------------------------------------------------------------------------------

def storage_root(storage: str) -> str:
    """An absolute local path (created and checked for writing) or a URI (its folder created;
    pyarrow must understand it)."""
    if is_uri(storage):
        root = Location.of(storage)
        try:
            root.create_dir()
        except OSError as err:
            raise UserError(f"--storage {storage}: cannot create the folder ({one_line(err)}); "
                            "check the URI and its credentials") from None
        return root.text
    root_path = Path(storage).expanduser().resolve()
    try:
        root_path.mkdir(parents=True, exist_ok=True)
        probe = root_path / f".tune-sana-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--storage {storage}: not writable ({err.strerror}); "
                        "choose a folder you can write to") from None
    return str(root_path)


def _latest_run(root: str | os.PathLike[str] | Location, prefix: str) -> Path | str | None:
    """The newest run of this space under ``root`` (by the folder's modification time, or its
    sweep.yaml's where the filesystem keeps none for folders)."""
    runs = [p for p in Location.of(root).entries(prefix=f"{prefix}-", dirs=True)
            if (p / SPEC_FILE).is_file()]
    if not runs:
        return None

    def mtime(run: Location) -> float:
        return run.mtime() or (run / SPEC_FILE).mtime() or 0.0

    return max(runs, key=mtime).public()


_NOT_IN_NAMES = frozenset("/\\%#?")  # separators, and what a URI decodes or cuts (%2e%2e: ..)


def check_run_name(name: str, what: str = "--name", uri: bool = False) -> str:
    """A run name becomes a folder: one path component, never a way out of the storage folder.
    Not empty, not starting with '.', no separator, control character, %, # or ? (a URI decodes
    %2e%2e to .., and # or ? end its path); on a URI (``uri``) no whitespace either."""
    odd = [c for c in name
           if c in _NOT_IN_NAMES or not c.isprintable() or (uri and c.isspace())]
    if not name or name.startswith(".") or odd or len(name.encode()) > 255:
        spaces = " or spaces on a URI" if uri else ""
        raise UserError(f"{what} {name!r}: a run name must be one folder name (not empty, not "
                        f"starting with '.', no / \\ % # ?{spaces}, at most 255 bytes); "
                        "e.g. --name lr-sweep-2")
    return name


def run_dir_for(spec_name: str, options: SweepOptions) -> Path | str:
    """The run directory: <storage>/<name>; on --resume without a name, the newest run of
    this space under storage. A Path for a local folder, the URI string for a URI. A name that
    is not one folder name (check_run_name) is a UserError before anything is created."""
    uri = is_uri(options.storage)
    if options.name is not None:
        check_run_name(options.name, uri=uri)
    elif not options.resume:
        check_run_name(spec_name, "the space file's name", uri=uri)
    root = Location.of(storage_root(options.storage))
    if options.name is not None:
        return (root / options.name).public()
    if options.resume:
        latest = _latest_run(root, spec_name)
        if latest is None:
            raise UserError(f"--resume: no earlier run of '{spec_name}' under {root}; "
                            "pass --name of the run to resume, or drop --resume")
        return latest
    return (root / f"{spec_name}-{time.strftime('%Y%m%d-%H%M%S')}").public()


def check_resumable(run_dir: str | os.PathLike[str], spec: SweepSpec) -> None:
    """--resume needs the same spec as the run it continues (Ray cannot change the space)."""
    saved = Location.of(run_dir) / SPEC_FILE
    if not saved.is_file():
        raise UserError(f"--resume: {run_dir} is not a tune-sana run (no {SPEC_FILE})")
    before = read_spec(run_dir)
    now = yaml.safe_load(spec.to_yaml())
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise UserError(f"--resume: the space differs from the run in {run_dir} "
                        f"(changed: {', '.join(changed)}); resume with the same file and "
                        "--set values, or start a new run without --resume")


def write_spec(run_dir: str | os.PathLike[str], spec: SweepSpec) -> None:
    folder = Location.of(run_dir)
    folder.create_dir()
    (folder / SPEC_FILE).write_text_atomic(spec.to_yaml())


# --- Ray -----------------------------------------------------------------------------------

def init_ray(options: SweepOptions) -> None:
    """Join ``--address`` (or $RAY_ADDRESS, as under ``ray job submit``), else start an embedded
    Ray bound to 127.0.0.1 without a dashboard (unless asked)."""
    address = options.address or os.environ.get("RAY_ADDRESS")
    if not address or str(address).split(":")[0] in ("127.0.0.1", "localhost"):
        _single_machine_mode()
    import ray

    # Rows between evaluations carry no val_loss: that is expected, not an error.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    if address:
        _check_reachable(address, options.connect_timeout_s)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as err:
            if "InvalidAuthToken" in repr(err.__cause__) or "auth" in str(err).lower():
                raise UserError(f"--address {address}: the cluster uses token authentication; "
                                "export RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN or "
                                "~/.ray/auth_token) and run again") from None
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"--address {address}: cannot join a Ray cluster there ({first}); "
                            "start one with 'ray start --head' or check the address") from None
        return
    with _without_auth_notice():
        ray.init(
            address="local",  # a new instance: never a cluster left running on this machine
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            include_dashboard=options.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


# Ray turns token authentication on for every new local instance and logs this notice at each
# start. For the embedded Ray it tells the user nothing to act on: the instance listens on
# 127.0.0.1 only, keeps token authentication on, and ends with the sweep. Only this message is
# dropped, only while the embedded Ray starts; joining a cluster (--address) logs what Ray says.
# (RAY_AUTH_MODE would silence it too, but =disabled turns authentication off, and =token set
# after ray is imported splits the driver, which read the mode at import, from Ray's servers.)
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_AUTH_NOTICE)


@contextlib.contextmanager
def _without_auth_notice() -> Iterator[None]:
    """Ray's token-authentication notice dropped from its log while the block runs."""
    logger = logging.getLogger(_AUTH_LOGGER)
    notice_filter = _DropAuthNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def _single_machine_mode() -> None:
    """Keep Ray on loopback: its servers bind 127.0.0.1 only, and a loopback address is not
    rewritten to this host's network address.

    Ray binds its gRPC servers and agents to the node's network address unless it runs in its
    single-machine mode (the one it uses on macOS and Windows), chosen by
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and read once when ray is imported. The variable is
    inherited by every Ray process this driver starts; the driver's own copy of the flag is set
    too in case ray was imported earlier.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


_RAY_CLIENT_PORT = 10001  # of a ray:// address that names none


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail in bounded time with one line if a host:port cluster address does not answer."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):  # ray.init refuses these
        raise UserError(f"--address {address}: a dashboard address is for 'ray job submit "
                        f"--address {address} -- tune-sana sweep ...'; to join the cluster "
                        "give its head's host:6379 or ray://host:10001")
    if "://" in address:  # ray://head:10001 (Ray Client)
        try:
            parts = urlsplit(address)
            host, port = parts.hostname, parts.port or _RAY_CLIENT_PORT
        except ValueError:
            host = None
        if not host or parts.scheme != "ray":
            raise UserError(f"--address {address}: expected host:port (e.g. 10.0.0.1:6379), "
                            "ray://host:10001 or auto")
    else:
        host, _, text = address.rpartition(":")
        if not host or not text.isdigit():
            raise UserError(f"--address {address}: expected host:port (e.g. 10.0.0.1:6379) "
                            "or auto")
        host, port = host.strip("[]"), int(text)
    if not 0 < port < 65536:
        raise UserError(f"--address {address}: port {port} is not a TCP port (1-65535)")
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            pass
    except OSError as err:
        raise UserError(f"--address {address}: no Ray head answers ({err}); start one with "
                        "'ray start --head' or check the address") from None


def _trainable_for(spec: SweepSpec, options: SweepOptions) -> Any:
    """The Tune trainable of this spec, with its resources (the same for both stages)."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(_trainable, fixed=dict(spec.fixed), trial=spec.trial,
                             cpus=spec.resources.cpu, metric=spec.metric,
                             report_every_s=options.report_every_s,
                             shipped=_shipped(spec, options), workers=_workers(spec)),
        _trial_resources(spec),
    )


def _trial_resources(spec: SweepSpec) -> dict[str, float]:
    res = spec.resources
    if res.workers > 1:
        return {"cpu": TRAINER_CPU}
    return {"cpu": res.cpu, "gpu": res.gpu, **res.custom}


def _workers(spec: SweepSpec) -> dict[str, Any] | None:
    """Ray Train settings of a multi-worker trial (None: one worker, in the Tune trial)."""
    res = spec.resources
    if res.workers == 1:
        return None
    return {"workers": res.workers, "parallel": res.parallel, "cpu": res.cpu, "gpu": res.gpu,
            "custom": dict(res.custom), "max_retries": spec.max_retries}


def _joins_cluster(options: SweepOptions) -> bool:
    """The sweep joins a Ray cluster (its trials may run on nodes that cannot see this one's
    disk), rather than starting the embedded single-machine Ray."""
    return bool(options.address or os.environ.get("RAY_ADDRESS"))


def _shipped(spec: SweepSpec, options: SweepOptions) -> dict[str, Any] | None:
    """On a cluster, the driver folders trials read (data, a local model), put into Ray's object
    store for trials on any node (engine/shipping.py); None on the embedded Ray."""
    if not _joins_cluster(options):
        return None
    from tune_sana.engine import shipping

    return shipping.ship(spec, say=_say) or None


def _storage_filesystem(run_dir: str | os.PathLike[str], options: SweepOptions) -> Any:
    """Ray's storage filesystem for a run: None (Ray resolves the path itself: the embedded
    Ray's local folder, or a URI every node reaches) or, on a cluster with a local run
    directory, the driver's disk served to every node through an actor (engine/driverfs.py)."""
    if not _joins_cluster(options) or not Location.of(run_dir).is_local:
        return None
    from tune_sana.engine import driverfs

    return driverfs.storage_filesystem(run_dir)


def _run_config(spec: SweepSpec, experiment: Location, recorder: Any,
                budget: Any = None, filesystem: Any = None, trackers: list[Any] | None = None
                ) -> Any:
    """Where a stage's Ray experiment goes, and how its trials stop, fail and checkpoint;
    ``budget`` (engine/budget.py) is both a stopper and a callback; ``filesystem``: Ray's
    storage filesystem (_storage_filesystem); ``trackers``: engine/trackers.py's callbacks."""
    from ray import tune
    from ray.tune.stopper import CombinedStopper

    from tune_sana.engine.interrupt import StopTune
    from tune_sana.engine.stopping import DivergenceStopper
    from tune_sana.engine.trackers import NoRayTensorBoard

    stop: Any = DivergenceStopper()
    trackers = trackers or []
    if budget is not None:
        stop = CombinedStopper(stop, budget)
    return tune.RunConfig(
        name=experiment.name, storage_path=experiment.parent.text, stop=stop,
        storage_filesystem=filesystem,
        # NoRayTensorBoard: Ray adds no TensorBoard logger of its own (engine/trackers.py)
        callbacks=[recorder, StopTune(), *([] if budget is None else [budget]), *trackers,
                   NoRayTensorBoard()],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )


def build_tuner(spec: SweepSpec, run_dir: str | os.PathLike[str], options: SweepOptions,
                restore: bool, warm: Any = None) -> Any:
    """The Tuner (fresh, or restored from ``run_dir``: a local folder or a URI); ``warm``: the
    fresh searcher's warm start (engine/warmstart.py)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune_sana.engine import study
    from tune_sana.engine.budget import failure_budget
    from tune_sana.engine.recorder import ResultsRecorder
    from tune_sana.engine.search import build_searcher

    trainable = _trainable_for(spec, options)
    location = Location.of(run_dir)
    filesystem = _storage_filesystem(run_dir, options)
    if restore:
        if spec.search.algorithm == "optuna":
            study.journal_path(run_dir)  # a URI run's study, fetched if no local copy has it
        return tune.Tuner.restore(location.text, trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=filesystem)
    searcher, param_space = build_searcher(spec, str(run_dir), warm=warm)
    if spec.search.algorithm in ("optuna", "frontier"):
        # Limit concurrency in the searcher itself: Tuner.restore keeps the searcher, but drops
        # TuneConfig.max_concurrent_trials (it sees an already wrapped search algorithm).
        searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    if spec.scheduler.type == "asha":
        # Steps, not Ray's training_iteration: one result may carry many steps (relay.py).
        scheduler: Any = ASHAScheduler(time_attr=relay.STEPS_KEY, max_t=max_t(spec),
                                       grace_period=spec.scheduler.grace_period,
                                       reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    recorder = ResultsRecorder(str(run_dir), spec.to_yaml(),
                               progress_every_s=options.progress_every_s, resume=options.resume,
                               fixed=dict(spec.fixed), **_stage_of(spec))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=spec.search.num_samples, reuse_actors=True,
        ),
        run_config=_run_config(spec, location, recorder, failure_budget(spec, run_dir),
                               filesystem=filesystem, trackers=_trackers(run_dir, options)),
    )


def _trackers(run_dir: str | os.PathLike[str], options: SweepOptions) -> list[Any]:
    """The --track callbacks (engine/trackers.py); none without --track."""
    if not options.track:
        return []
    from tune_sana.engine import trackers

    return trackers.callbacks(options.track, run_dir, Location.of(run_dir).name)


def _stage_of(spec: SweepSpec) -> dict[str, Any]:
    """The recorder's stage for the main Tuner: search, or frontier with its combo keys."""
    if spec.search.algorithm != "frontier":
        return {}
    from tune_sana.engine import frontier

    return {"stage": frontier.STAGE, "combo_keys": frontier.combo_keys(spec)}


def build_confirm_tuner(spec: SweepSpec, run_dir: str | os.PathLike[str],
                        options: SweepOptions, replicas: list[dict[str, Any]] | None) -> Any:
    """The confirm stage's Tuner: each of ``replicas`` (searched values + seed) run once, no
    pruning, recorded into the run's own record with stage confirm; its Ray experiment in
    <run dir>/confirm. ``replicas`` None: restored from there."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune_sana.engine import confirm
    from tune_sana.engine.recorder import ResultsRecorder

    trainable = _trainable_for(spec, options)
    experiment = Location.of(run_dir) / confirm.FOLDER
    filesystem = _storage_filesystem(run_dir, options)
    if replicas is None:
        return tune.Tuner.restore(experiment.text, trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=filesystem)
    searcher = ConcurrencyLimiter(confirm.ReplicaSearcher(replicas, spec.metric, spec.mode),
                                  max_concurrent=spec.search.max_concurrent)
    # resume: the record already holds the search; confirm trials are appended to it.
    recorder = ResultsRecorder(str(run_dir), spec.to_yaml(),
                               progress_every_s=options.progress_every_s, resume=True,
                               fixed=dict(spec.fixed), stage=confirm.STAGE_CONFIRM)
    return tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=FIFOScheduler(),
            num_samples=len(replicas), reuse_actors=True,
        ),
        run_config=_run_config(spec, experiment, recorder, filesystem=filesystem,
                               trackers=_trackers(run_dir, options)),
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_confirm(spec: SweepSpec, run_dir: str | os.PathLike[str], options: SweepOptions) -> None:
    """The confirm stage after a finished search (engine/confirm.py); nothing without
    search.confirm. On --resume it is restored from its Ray experiment, or skipped when every
    replica is recorded. A stage cut short (Ray ends ``fit`` quietly on Ctrl-C), or a search
    cut short before it, is a KeyboardInterrupt: the run is not done, --resume finishes it."""
    if spec.search.confirm is None:
        return
    from tune_sana.engine import confirm

    rows = confirm.trial_rows(run_dir)
    if not confirm.search_finished(spec, rows):
        _say("confirm: the search stopped before all its trials finished; --resume finishes "
             "it, then runs the confirm stage")
        raise KeyboardInterrupt
    chosen = confirm.plan(spec, rows)
    total = len(chosen.replicas())
    if not total:
        _say(chosen.describe())
        return
    pending = chosen.pending(spec, rows)
    if not pending:
        _say(f"confirm: all {total} trial{'' if total == 1 else 's'} already recorded")
        return
    done = total - len(pending)
    resumed = f" (resumed: {done} of {total} already recorded)" if done else ""
    _say(chosen.describe() + resumed)
    experiment = Location.of(run_dir) / confirm.FOLDER
    restore = options.resume and bool(
        experiment.entries(prefix="experiment_state-", suffix=".json", dirs=False))
    build_confirm_tuner(spec, run_dir, options, None if restore else pending).fit()
    if chosen.pending(spec, confirm.trial_rows(run_dir)):
        _say("confirm: stopped before all its trials finished; --resume runs the rest")
        raise KeyboardInterrupt


def encode_once(spec: SweepSpec) -> SweepSpec:
    """Encode an image folder or manifest once, on the driver, into the shared latent cache (a
    no-op when it is already built), and point the spec at it: trials never encode."""
    if spec.trial not in TRIAL_CONFIG_TRIALS:
        return spec
    from tune_sana.data.cache import is_encoded, prepare_data

    data = spec.fixed.get("data", TrialConfig.model_fields["data"].default)
    if "data" in spec.space:
        raw = [d for d in spec.space["data"].values() if not is_encoded(str(d))]
        if raw:
            raise UserError(f"space.data: '{raw[0]}' is not encoded; searched data must be "
                            "builtin:* or folders made by tune-sana cache")
        return spec
    if is_encoded(str(data)):
        return spec
    if "model" in spec.space:
        raise UserError("data is an image folder but model is searched: the encoders come from "
                        "one checkpoint; encode first with tune-sana cache, then pass the folder")
    model = spec.fixed.get("model", TrialConfig.model_fields["model"].default)
    prepared = prepare_data(str(data), str(model))
    return spec.model_copy(update={"fixed": {**spec.fixed, "data": prepared}})


def run(spec: SweepSpec, options: SweepOptions, spec_name: str = "sweep") -> Path | str:
    """Run (or resume) the sweep; returns the run directory holding the Parquet record (a Path
    for local storage, the URI string for a URI). One sweep at a time writes a run directory
    (engine/runlock.py); Ctrl-C stops it cleanly and says how to resume (engine/interrupt.py)."""
    from tune_sana.engine import runlock

    spec = encode_once(spec)  # sweep.yaml then names the encoded folder every trial reads
    run_dir = run_dir_for(spec_name, options)
    with runlock.hold(run_dir):
        return _run_held(spec, options, run_dir)


def _run_held(spec: SweepSpec, options: SweepOptions, run_dir: Path | str) -> Path | str:
    """run() while this process holds the run directory's lock."""
    if options.resume:
        check_resumable(run_dir, spec)
        from tune_sana.record.quarantine import prepare_resume

        moved = prepare_resume(run_dir)  # corrupt history parts aside; other corrupt files: error
        if moved:
            _say(moved)
    elif Location.of(run_dir).entries(hidden=True):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or "
                        "choose another --name")
    preflight.check_scheduler(spec)
    warm = _warm_start(spec, options)
    preflight.check_local(spec)  # also builds the demo base once, if a trial uses it
    init_ray(options)
    preflight.check_cluster(spec)
    from tune_sana.engine import diskfull, interrupt

    # SignalStop after ray.init sets its SIGTERM one; a failed record write (a full disk) stops
    # the sweep with its own line (engine/diskfull.py).
    with interrupt.SignalStop(run_dir, options) as stop, diskfull.stops(run_dir, options):
        return _run_recorded(spec, options, run_dir, stop, warm)


def _warm_start(spec: SweepSpec, options: SweepOptions) -> Any:
    """The --warm-start runs' trials (engine/warmstart.py), read and checked before anything is
    written; None without --warm-start."""
    if not options.warm_start:
        return None
    from tune_sana.engine import warmstart

    warm = warmstart.load(spec, options.warm_start)
    if options.resume:
        _say("--warm-start: a resumed sweep keeps the warm trials its study already holds; "
             "none are added")
        return None
    _say(warm.describe())
    return warm


def _run_recorded(spec: SweepSpec, options: SweepOptions, run_dir: Path | str,
                  stop: Any, warm: Any = None) -> Path | str:
    """The sweep writing its run: the spec, the search, the confirm stage. ``stop``
    (interrupt.SignalStop): a signal ends Tune's loop quietly, so it is checked around fit."""
    if not options.resume:
        write_spec(run_dir, spec)

    # Ray can restore only once it has saved experiment state; a driver killed before that
    # leaves nothing to restore, and the sweep starts afresh in the same run directory.
    restore = options.resume and bool(
        Location.of(run_dir).entries(prefix="experiment_state-", suffix=".json", dirs=False))
    tuner = build_tuner(spec, run_dir, options, restore=restore, warm=warm)
    stop.check()
    tuner.fit()
    stop.check()
    from tune_sana.engine import budget, study

    stopped = budget.stop_note(run_dir)  # the failure budget ended the search early
    study.close(spec, run_dir, stopped)  # the Optuna study: no trial RUNNING once it is over
    if stopped is None:
        run_confirm(spec, run_dir, options)
    if spec.search.algorithm == "frontier":
        _say_frontier(spec, run_dir)
    return run_dir


def _say_frontier(spec: SweepSpec, run_dir: str | os.PathLike[str]) -> None:
    """The frontier search's closing line: its verdicts, and whether the budget ran out."""
    from collections import Counter

    from tune_sana.engine.frontier import budget_note
    from tune_sana.record.readers import read_frontier

    table = read_frontier(run_dir)
    if table is None:
        return
    rows = table.to_pylist()
    counts = Counter(str(r["verdict"]).replace("_", " ") for r in rows)
    _say(f"frontier: {len(rows)} combination{'' if len(rows) == 1 else 's'}: "
         + ", ".join(f"{n} {v}" for v, n in counts.most_common())
         + f"; tune-sana report {run_dir} shows them")
    note = budget_note(spec, rows)
    if note:
        _say(note)
