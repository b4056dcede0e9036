"""Each engine default is defined once, in the module that owns it; the CLI and the options
read it from there."""

from __future__ import annotations

import inspect

import pytest

from tune_sana import cli
from tune_sana.engine import relay, sweep


def test_the_cli_defaults_are_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["sweep"])
    assert cli._sweep_options(args, resume=False) == sweep.SweepOptions()
    monkeypatch.setattr(sweep, "DEFAULT_STORAGE", "elsewhere")
    monkeypatch.setattr(sweep, "PROGRESS_EVERY_S", 2.5)
    monkeypatch.setattr(relay, "EVERY_S", 0.25)
    for command in (["sweep"], ["resume", "somewhere"]):
        args = cli.build_parser().parse_args(command)
        assert (args.progress_every, args.report_every) == (2.5, 0.25)
    assert cli.build_parser().parse_args(["sweep"]).storage == "elsewhere"


def test_the_recorder_takes_its_interval_from_the_sweep_only() -> None:
    from tune_sana.engine.recorder import ResultsRecorder

    interval = inspect.signature(ResultsRecorder).parameters["progress_every_s"]
    assert interval.default is inspect.Parameter.empty
    assert interval.kind is inspect.Parameter.KEYWORD_ONLY
