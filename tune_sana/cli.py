"""The ``tune-sana`` command: each subcommand is a thin call into one module.

User errors print one line to stderr and exit with status 2; tracebacks are for bugs. A sweep
stopped by its failure budget (search.max_diverged, engine/budget.py) exits with status 3, its
finished trials recorded. A sweep whose record could not be written (a full disk,
engine/diskfull.py) stops with one line naming the file and the resume command, status 4. Ctrl-C:
130 (engine/interrupt.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tune_sana.config import (
    DEMO_BASE,
    UserError,
    build_config,
    parse_overrides,
    read_yaml_mapping,
)
from tune_sana.engine import relay, sweep
from tune_sana.outcomes import BASE_SAMPLES_KEY, SAMPLES_KEY, Outcome

Command = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, its errors (an unknown flag, a value of the wrong type) as one line like every
    other user error, naming the --help that lists the options."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tune-sana: error: {message}; see {self.prog} --help\n")


def cmd_trial(args: argparse.Namespace) -> int:
    from trials import sana_finetune
    from tune_sana.training.demo_base import ensure_demo_base

    values = read_yaml_mapping(args.config) if args.config else {}
    values.update(parse_overrides(args.set))
    config = build_config(values, source=args.config or "--set")
    config = _prepared(config)
    if config.model == DEMO_BASE:
        ensure_demo_base()

    def report(row: dict[str, Any]) -> None:
        for key in (SAMPLES_KEY, BASE_SAMPLES_KEY):  # PNG text: a sweep saves it in samples/
            row.pop(key, None)
        print(json.dumps(row), flush=True)

    summary = sana_finetune.run(config, report)
    # A trial that ran to its verdict (also a divergence) succeeded; one that raised did not.
    return 0 if summary["outcome"] in (Outcome.COMPLETED, Outcome.DIVERGED,
                                       Outcome.COLLAPSED) else 1


def _check_out(out: str | None, flag: str = "--out") -> None:
    """An output folder this user can make, checked before the work that fills it: its nearest
    existing ancestor is a folder where a temporary folder can be made (and is removed)."""
    if out is None:
        return
    import tempfile

    target = Path(out).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {out}: a file is there; choose a folder")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        Path(tempfile.mkdtemp(prefix=".tune-sana-write-test-", dir=ancestor)).rmdir()
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot write there ({err.strerror} at {ancestor}); "
                        "choose a folder you can write to") from None


def cmd_make_base(args: argparse.Namespace) -> int:
    from tune_sana.training.demo_base import make_base

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: the base needs at least 1 pretraining step "
                        "(default 1500)")
    _check_out(args.out)
    folder = make_base(Path(args.out) if args.out else None, steps=args.steps, force=args.force)
    print(folder)
    return 0


def _sweep_options(args: argparse.Namespace, resume: bool) -> Any:
    for flag, value in (("--progress-every", args.progress_every),
                        ("--report-every", args.report_every)):
        if not value >= 0:
            raise UserError(f"{flag} {value:g}: must be 0 or more seconds")
    for flag, count, least in (("--num-cpus", args.num_cpus, 1), ("--num-gpus", args.num_gpus, 0)):
        if count is not None and count < least:
            raise UserError(f"{flag} {count}: must be at least {least} (what the embedded Ray "
                            "may use of this machine)")
    return sweep.SweepOptions(
        name=args.name, storage=args.storage, address=args.address, resume=resume,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, dashboard=args.dashboard,
        progress_every_s=args.progress_every, report_every_s=args.report_every,
        warm_start=tuple(getattr(args, "warm_start", None) or ()),
        track=_trackers(args, resume),
    )


def _trackers(args: argparse.Namespace, resume: bool) -> tuple[str, ...]:
    """--track's trackers, checked (engine/trackers.py: imported only when one is named)."""
    names = getattr(args, "track", None) or []
    if not names:
        return ()
    from tune_sana.engine import trackers

    return trackers.check(names, resume=resume, storage=args.storage)


def _finish_sweep(run_dir: Path | str) -> int:
    from tune_sana.engine.budget import EXIT_STATUS, stop_note
    from tune_sana.record.readers import read_trials

    table = read_trials(run_dir, ["outcome"])
    counts: dict[str, int] = {}
    for outcome in table.column(0).to_pylist():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no finished trials"
    stopped = stop_note(run_dir) is not None
    verdict = "sweep stopped by its failure budget" if stopped else "sweep done"
    print(f"tune-sana: {verdict}: {summary}", file=sys.stderr)
    print(f"tune-sana: results in {run_dir}  (next: tune-sana report {run_dir})", file=sys.stderr)
    print(run_dir)
    return EXIT_STATUS if stopped else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tune_sana.engine import space

    spec = space.load(args.space, parse_overrides(args.set))
    name = Path(args.space).stem if args.space else "quickstart"
    run_dir = sweep.run(spec, _sweep_options(args, args.resume), spec_name=name)
    return _finish_sweep(run_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    from tune_sana.engine import space
    from tune_sana.record.readers import read_spec
    from tune_sana.record.schema import SPEC_FILE
    from tune_sana.record.storage import Location, is_uri

    given = args.run_dir if is_uri(args.run_dir) else str(Path(args.run_dir).expanduser().resolve())
    run_dir = Location.of(given)
    spec_file = run_dir / SPEC_FILE
    if not spec_file.is_file():
        raise UserError(f"{run_dir}: not a tune-sana run (no {SPEC_FILE}); "
                        "pass the folder that tune-sana sweep printed")
    spec = space.parse_spec(read_spec(run_dir), source=str(spec_file))
    args.name, args.storage = run_dir.name, run_dir.parent.text
    return _finish_sweep(sweep.run(spec, _sweep_options(args, True), spec_name=run_dir.name))


def cmd_report(args: argparse.Namespace) -> int:
    from tune_sana.analysis.report import report
    from tune_sana.record.readers import skipping_corrupt

    with skipping_corrupt(args.skip_corrupt) as skipped:
        text = report(args.run_dirs, top=args.top, plots_dir=args.plots, html_file=args.html)
    print(text, end="")
    if skipped:
        print(f"tune-sana: --skip-corrupt: left out {len(skipped)} unreadable "
              f"file{'s' if len(skipped) > 1 else ''}: "
              + "; ".join(f"{s.location}: {s.reason}" for s in skipped), file=sys.stderr)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from tune_sana.analysis.best import best_config, format_config

    _, config, header = best_config(args.run_dir, args.frontier, args.margin)
    if args.format == "json" and args.frontier is not None:  # JSON has no header: say it here
        print(f"tune-sana: {header.splitlines()[0]}", file=sys.stderr)
    print(format_config(config, args.format, header), end="")
    return 0


def _prepared(config: Any) -> Any:
    """The config with an images folder / manifest as ``data`` replaced by its encoded cache."""
    from tune_sana.data.cache import prepare_data

    return config.model_copy(update={"data": prepare_data(config.data, config.model)})


def cmd_cache(args: argparse.Namespace) -> int:
    from tune_sana.data.cache import build_cache

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "func", "data", "model") and v is not None}
    _check_out(args.cache_root, "--cache-root")  # before the encoders run, not after
    print(build_cache(args.data, args.model, **options))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tune_sana.engine.export import export

    _check_out(args.out)
    print(export(args.run_dir, args.trial, out=args.out, device=args.device, force=args.force))
    return 0


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="join a Ray cluster (host:port, auto, ray://...)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray")
    parser.add_argument("--num-gpus", type=int, help="GPUs for the embedded local Ray")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard (on 127.0.0.1) with the embedded Ray")
    parser.add_argument("--progress-every", type=float, default=sweep.PROGRESS_EVERY_S,
                        metavar="SECONDS", help="seconds between progress lines "
                        f"(default {sweep.PROGRESS_EVERY_S:g})")
    parser.add_argument("--report-every", type=float, default=relay.EVERY_S, metavar="SECONDS",
                        help="how long a trial may hold its step rows before sending them to "
                        "the driver; evaluations, verdicts and checkpoints go at once "
                        f"(default {relay.EVERY_S:g}; 0 sends every step)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    base.add_argument("--out", help="folder to write (default: $TUNE_SANA_HOME/demo-base-v<N>, "
                      "N the demo base's version)")
    base.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    base.add_argument("--force", action="store_true", help="rebuild even if it exists")
    base.set_defaults(func=cmd_make_base)

    sweep_cmd = sub.add_parser("sweep", help="run a search over a space file with Ray Tune")
    sweep_cmd.add_argument("space", nargs="?", help="space YAML (default: the built-in "
                           "search_spaces/quickstart.yaml)")
    sweep_cmd.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="fix a trial setting (lr=1e-4) or a spec field "
                           "(search.num_samples=8)")
    sweep_cmd.add_argument("--name", help="run name (default: <space>-<timestamp>)")
    sweep_cmd.add_argument("--storage", default=sweep.DEFAULT_STORAGE,
                           help="folder or URI pyarrow understands (file:///..., "
                           f"s3://bucket/path) holding runs (default: ./{sweep.DEFAULT_STORAGE})")
    sweep_cmd.add_argument("--resume", action="store_true",
                           help="continue the run named by --name (default: this space's newest)")
    sweep_cmd.add_argument("--warm-start", dest="warm_start", action="append", metavar="RUN_DIR",
                           help="seed the Optuna search with the finished trials of an earlier "
                           "run of the same space keys (repeatable)")
    sweep_cmd.add_argument("--track", action="append", metavar="TRACKER",
                           help="also log every step to tensorboard, mlflow or wandb "
                           "(repeatable; files under the run directory, W&B offline unless "
                           "logged in)")
    _add_ray_options(sweep_cmd)
    sweep_cmd.set_defaults(func=cmd_sweep)

    resume = sub.add_parser("resume", help="continue a killed sweep from its run directory")
    resume.add_argument("run_dir", help="the run's folder or URI")
    _add_ray_options(resume)
    resume.set_defaults(func=cmd_resume)

    rep = sub.add_parser("report", help="tables (and charts) of one or more run dirs, "
                                        "from their Parquet files; works while a sweep runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--top", type=int, default=10, help="trials in the ranking (default 10)")
    rep.add_argument("--plots", metavar="DIR", help="write stability map, curves and causes PNGs")
    rep.add_argument("--html", metavar="FILE", help="write one self-contained HTML page")
    rep.add_argument("--skip-corrupt", action="store_true",
                     help="report what is readable, leaving out corrupt files (named on stderr)")
    rep.set_defaults(func=cmd_report)

    best = sub.add_parser("best", help="the best configuration (the best confirmed mean when "
                          "the run has a confirm stage), for trial --config")
    best.add_argument("run_dir")
    best.add_argument("--format", choices=["yaml", "json"], default="yaml")
    best.add_argument("--frontier", metavar="RUN_DIR",
                      help="a frontier run (search.algorithm: frontier): choose only among "
                      "trials whose lr is at most --margin x their combination's stable lr there")
    best.add_argument("--margin", type=float, metavar="X",
                      help="fraction of the stable lr, in (0, 1] (default 0.5 with --frontier)")
    best.set_defaults(func=cmd_best)

    cache = sub.add_parser("cache", help="encode an image folder or manifest once (DC-AE "
                           "latents + Gemma-2 caption embeddings); prints the folder for data:")
    cache.add_argument("data", help="image folder (x.png + x.txt captions) or .jsonl/.parquet "
                       "manifest (image, caption)")
    cache.add_argument("--model", required=True,
                       help="Sana pipeline folder or hub id (vae/, text_encoder/, tokenizer/)")
    cache.add_argument("--resolution", type=int, help="image side in px (default: checkpoint's)")
    cache.add_argument("--size-policy", dest="size_policy", choices=["crop", "stretch", "exact"],
                       help="crop (default): scale short side + center crop; stretch; exact")
    cache.add_argument("--allow-upscale", dest="allow_upscale", action="store_true", default=None,
                       help="accept images smaller than the resolution")
    cache.add_argument("--max-sequence-length", dest="max_sequence_length", type=int,
                       help="caption tokens (default 300)")
    cache.add_argument("--no-complex-human-instruction", dest="complex_human_instruction",
                       action="store_false", default=None,
                       help="encode captions without SanaPipeline's default instruction prefix")
    cache.add_argument("--val-fraction", dest="val_fraction", type=float,
                       help="held-out share (default 0.1)")
    cache.add_argument("--val-max", dest="val_max", type=int,
                       help="at most this many held-out samples (default 32)")
    cache.add_argument("--variant", help="encoder weight variant (default: auto)")
    cache.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                       help="leave bad files out (listed in meta.json) instead of failing")
    cache.add_argument("--batch-size", dest="batch_size", type=int, help="per encoder call")
    cache.add_argument("--device", choices=["auto", "cpu", "cuda"])
    cache.add_argument("--cache-root", dest="cache_root",
                       help="default: $TUNE_SANA_HOME/cache")
    cache.set_defaults(func=cmd_cache)

    exp = sub.add_parser("export", help="re-run a completed trial and save its weights "
                         "(transformer folder or LoRA adapter)")
    exp.add_argument("run_dir")
    exp.add_argument("--trial", required=True, help="trial id (trials.parquet trial_id)")
    exp.add_argument("--out", help="folder to write (default: <run dir>/export/<trial id>)")
    exp.add_argument("--device", choices=["auto", "cpu", "cuda"],
                     help="override the trial's device (exact repeats need the same one)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp.set_defaults(func=cmd_export)

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
    except KeyboardInterrupt as err:  # engine/interrupt.py: the line says how to resume
        print(f"tune-sana: {str(err) or 'interrupted'}", file=sys.stderr)
        return int(getattr(err, "code", 130))


if __name__ == "__main__":
    sys.exit(main())
