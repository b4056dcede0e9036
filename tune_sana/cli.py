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
