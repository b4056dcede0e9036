"""The ``tune-sana`` command: each subcommand is a thin call into one module.

User errors print one line to stderr and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tune_sana.config import UserError, build_config, parse_overrides

Command = Callable[[argparse.Namespace], int]


def _read_yaml_mapping(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: malformed YAML{where}; fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of key: value at the top level")
    return loaded


def cmd_trial(args: argparse.Namespace) -> int:
    from trials import sana_finetune
    from tune_sana.pretrain import ensure_demo_base

    values = _read_yaml_mapping(args.config) if args.config else {}
    values.update(parse_overrides(args.set))
    config = build_config(values, source=args.config or "--set")
    if config.model == "demo-base":
        ensure_demo_base()

    def report(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)

    summary = sana_finetune.run(config, report)
    return 0 if summary["outcome"] in ("completed", "diverged") else 1


def cmd_make_base(args: argparse.Namespace) -> int:
    from tune_sana.pretrain import make_base

    folder = make_base(Path(args.out) if args.out else None, steps=args.steps, force=args.force)
    print(folder)
    return 0


def _sweep_options(args: argparse.Namespace, resume: bool) -> Any:
    from tune_sana.sweep import SweepOptions

    return SweepOptions(
        name=args.name, storage=args.storage, address=args.address, resume=resume,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, dashboard=args.dashboard,
        progress_every_s=args.progress_every,
    )


def _finish_sweep(run_dir: Path) -> int:
    from tune_sana.results import read_trials

    table = read_trials(run_dir, ["outcome"])
    counts: dict[str, int] = {}
    for outcome in table.column(0).to_pylist():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no finished trials"
    print(f"tune-sana: sweep done: {summary}", file=sys.stderr)
    print(f"tune-sana: results in {run_dir}  (next: tune-sana report {run_dir})", file=sys.stderr)
    print(run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tune_sana import space, sweep

    spec = space.load(args.space, parse_overrides(args.set))
    name = Path(args.space).stem if args.space else "quickstart"
    run_dir = sweep.run(spec, _sweep_options(args, args.resume), spec_name=name)
    return _finish_sweep(run_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    from tune_sana import space, sweep
    from tune_sana.results import SPEC_FILE

    run_dir = Path(args.run_dir).expanduser().resolve()
    spec_file = run_dir / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{run_dir}: not a tune-sana run (no {SPEC_FILE}); "
                        "pass the folder that tune-sana sweep printed")
    spec = space.load(spec_file)
    args.name, args.storage = run_dir.name, str(run_dir.parent)
    run_dir = sweep.run(spec, _sweep_options(args, True), spec_name=run_dir.name)
    return _finish_sweep(run_dir)


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="join a Ray cluster (host:port, auto, ray://...)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray")
    parser.add_argument("--num-gpus", type=int, help="GPUs for the embedded local Ray")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard (on 127.0.0.1) with the embedded Ray")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between progress lines (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune-sana",
        description="Find Sana fine-tuning settings that train well and stay finite.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    trial = sub.add_parser("trial", help="run one fine-tuning trial in-process, without Ray")
    trial.add_argument("--config", help="YAML file of trial settings")
    trial.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one setting (repeatable), e.g. --set lr=1e-4")
    trial.set_defaults(func=cmd_trial)

    base = sub.add_parser("make-base", help="build the tiny pretrained demo base checkpoint")
    base.add_argument("--out", help="folder to write (default: $TUNE_SANA_HOME/demo-base)")
    base.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    base.add_argument("--force", action="store_true", help="rebuild even if it exists")
    base.set_defaults(func=cmd_make_base)

    sweep = sub.add_parser("sweep", help="run a search over a space file with Ray Tune")
    sweep.add_argument("space", nargs="?",
                       help="space YAML (default: the built-in search_spaces/quickstart.yaml)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="fix a trial setting (lr=1e-4) or a spec field (search.num_samples=8)")
    sweep.add_argument("--name", help="run name (default: <space>-<timestamp>)")
    sweep.add_argument("--storage", default="runs", help="folder holding runs (default: ./runs)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the run named by --name (default: this space's newest)")
    _add_ray_options(sweep)
    sweep.set_defaults(func=cmd_sweep)

    resume = sub.add_parser("resume", help="continue a killed sweep from its run directory")
    resume.add_argument("run_dir")
    _add_ray_options(resume)
    resume.set_defaults(func=cmd_resume)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except UserError as err:
        print(f"tune-sana: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune-sana: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
