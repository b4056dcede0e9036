"""Where the Optuna study of a sweep lives: a journal file in the run directory.

    optuna-dashboard <run dir>/optuna_journal.log

The study is stored with Optuna's JournalStorage on a JournalFileBackend, not SQLite:

- the driver's searcher is its only writer, and each write is one appended, fsync'd JSON line;
  a reader (optuna-dashboard while the sweep runs) never locks the writer out, where an SQLite
  reader's shared lock can make the searcher's commit fail with "database is locked";
- the file backend locks with a symlink, which works on NFS (a cluster's shared ``--storage``),
  where SQLite's fcntl locks are unreliable;
- no server, no schema and no SQLAlchemy on the path: each change is one ``write`` of whole
  JSON lines, which a killed driver does not tear and a person can read;
- the storage pickles as its path (Ray saves the searcher with every experiment checkpoint), so
  ``Tuner.restore`` reopens the same file: ``--resume`` continues the one study, never a copy.

A run directory on a URI (``s3://...``) cannot hold an appendable file: the journal is kept in a
local cache, ``$TUNE_SANA_HOME/studies/<hash of the run URI>/``, copied into the run after each
search (``close``), and fetched back from the run when a resume finds no local copy.

Every trial's state is its true one (engine/search.py tells them): completed -> COMPLETE;
diverged or collapsed -> COMPLETE with a penalty value and an infeasible constraint; pruned by
the scheduler -> PRUNED; raised or died -> FAIL. ``close`` fails the trials still RUNNING once
the search is over (in flight when the failure budget stopped it, or lost by Ray); a search cut
short by Ctrl-C keeps them RUNNING until ``--resume`` finishes them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tune_sana.config import home
from tune_sana.engine.confirm import search_finished, trial_rows
from tune_sana.engine.space import SweepSpec
from tune_sana.record.storage import Location

STUDY_FILE = "optuna_journal.log"
TRIAL_ID_ATTR = "trial_id"  # user attr: the Ray trial id (trials.parquet's trial_id)
OUTCOME_ATTR = "outcome"  # user attr: the trial's outcome as tune-sana records it
STOPPED_ATTR = "stopped"  # user attr of a trial failed by ``close``: why it never finished


def journal_path(run_dir: str | os.PathLike[str]) -> Path:
    """The local journal of a run: in the run folder, or the cache for a URI run (fetched from
    the run when the cache has none)."""
    run = Location.of(run_dir)
    if run.is_local:
        return Path(run.path) / STUDY_FILE
    digest = hashlib.sha256(run.text.encode()).hexdigest()[:16]
    local = home() / "studies" / digest / STUDY_FILE
    remote = run / STUDY_FILE
    if not local.is_file() and remote.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(remote.read_text())
    return local


def storage(run_dir: str | os.PathLike[str]) -> JournalStorage:
    """The run's study storage (its journal file created, empty, if absent)."""
    path = journal_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_name(run_dir: str | os.PathLike[str]) -> str:
    """The study's name: the run's name (the folder's, as the dashboard lists it)."""
    return Location.of(run_dir).name


def load(run_dir: str | os.PathLike[str]) -> optuna.Study | None:
    """The run's study, or None when the run has none (not an optuna search, or no trial yet)."""
    if not journal_path(run_dir).is_file():
        return None
    store = storage(run_dir)
    names = optuna.get_all_study_names(store)
    if not names:
        return None
    return optuna.load_study(study_name=names[0], storage=store)


def fail_running(study: optuna.Study, why: str, keep: set[int] | frozenset[int] = frozenset()
                 ) -> list[int]:
    """Tell FAIL every RUNNING trial whose number is not in ``keep``, with ``why`` as its
    ``stopped`` user attr (Optuna's own state for a trial whose run was cut off: TPE ignores it,
    as it says nothing about the configuration). Returns the numbers failed."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number in keep:
            continue
        optuna.Trial(study, trial._trial_id).set_user_attr(STOPPED_ATTR, why)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        failed.append(trial.number)
    return failed


def close(spec: SweepSpec, run_dir: str | os.PathLike[str], stopped: str | None) -> None:
    """After the search stage of an optuna sweep: once the search is over (every trial
    recorded, or ``stopped`` by the failure budget with that note), fail the trials still
    RUNNING; a URI run gets the local journal copied in. A search cut short by Ctrl-C keeps its
    RUNNING trials for ``--resume``."""
    if spec.search.algorithm != "optuna":
        return
    study = load(run_dir)
    if study is None:
        return
    if stopped is not None or search_finished(spec, trial_rows(run_dir)):
        fail_running(study, "in flight when the failure budget stopped the sweep" if stopped
                     else "the search ended without a result for it")
    run = Location.of(run_dir)
    if not run.is_local:
        (run / STUDY_FILE).write_text_atomic(journal_path(run_dir).read_text())
