"""`bayesmeta fit | evaluate | sample | report`: the command line. Errors print one line, exit non-zero."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from bayesmeta.config import ConfigError

EXIT_CONFIG, EXIT_RUN, EXIT_INTERRUPT = 2, 1, 130
# any of these makes a folder a run that a plain `fit` must not overwrite
RUN_FILES = ("config.toml", "checkpoint/state.npz", "metrics.json", "inference.nc", "summary.md")

MAX_SAMPLES = 10_000
"""Most posterior predictive draws `sample` takes (each adapts to the support set once)."""
MAX_SAMPLE_STEPS = 100_000
"""Most test-time inner steps `sample` takes."""


class UsageError(ValueError):
    """A bad command line (argparse's message); exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised, printed by main), not usage text and SystemExit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bayesmeta", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="meta-train a method, evaluate it and write runs/<name>/")
    f.add_argument("config", nargs="?", help="TOML config (default: the built-in sinusoid MAML run)")
    f.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=1000 (repeatable)",
    )
    f.add_argument("--run-dir", type=Path, help="output folder (default: runs/<name>)")
    f.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    f.add_argument("--force", action="store_true", help="start over in a run folder that has a checkpoint")
    f.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one log line every train.eval_every steps instead (for batch jobs)",
    )
    f.add_argument(
        "--distributed",
        action="store_true",
        help="train as one process of a multi-process run on JAX's distributed runtime (process 0 writes "
        "the run folder; see docs/getting-started.md)",
    )
    f.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="with --distributed: process 0's address (default: JAX_COORDINATOR_ADDRESS or the cluster's)",
    )
    f.add_argument("--num-processes", type=int, help="with --distributed: processes in the run")
    f.add_argument("--process-id", type=int, help="with --distributed: this process's index, 0..N-1")
    e = sub.add_parser("evaluate", help="re-evaluate a run from its checkpoint and rewrite its report")
    e.add_argument("run_dir", type=Path)
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override evaluation settings, e.g. --set eval.tasks=100",
    )
    e.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("sample", help="draw posterior predictive functions for one support set")
    s.add_argument("run_dir", type=Path)
    src = s.add_mutually_exclusive_group()
    src.add_argument(
        "--support", type=Path, help="CSV (rows x..., y...) or NPZ (arrays x, y) of support points"
    )
    src.add_argument("--task-seed", type=int, default=0, help="else: a task of the run's evaluation family")
    s.add_argument(
        "--query", type=Path, help="CSV/NPZ of query inputs (default: a grid over the input range)"
    )
    s.add_argument("--samples", type=int, default=20, help="posterior predictive draws (default 20)")
    s.add_argument("--steps", type=int, help="test-time inner steps (default: the last of eval.inner_steps)")
    s.add_argument(
        "--out",
        type=Path,
        help="output folder (default: RUN_DIR/samples); each call adds sample_<n>.nc and sample_<n>.png",
    )
    r = sub.add_parser("report", help="redraw summary.md and plots from a run's files")
    r.add_argument("run_dir", type=Path)
    return p


def _print_summary(run_dir: Path, metrics: dict) -> None:
    from bayesmeta import report

    print(
        f"\n{metrics['method']} on {metrics['family']}: {metrics['steps']} steps in "
        f"{metrics['train_seconds']:.1f} s"
    )
    for k, v in metrics["metrics"].items():
        print(f"  {k:>14s} = {report.metric_line(v)}")
    print(f"run folder: {run_dir}/  (summary.md, metrics.json, inference.nc, plots/)")


def _fit(args: argparse.Namespace) -> int:
    from bayesmeta import registry, run

    if args.distributed:
        from bayesmeta.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        print(
            "bayesmeta: error: --coordinator, --num-processes and --process-id need --distributed",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from bayesmeta.distributed import is_primary

    cfg_path = args.config
    if cfg_path is None and args.resume and args.run_dir is not None:
        cfg_path = args.run_dir / "config.toml"
    cfg = registry.load_config(cfg_path, args.set)
    run_dir = args.run_dir or run.default_run_dir(cfg)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not (args.resume or args.force) and is_primary():
        print(
            f"bayesmeta: error: {run_dir} already holds a run ({found[0]} exists); pass --resume to "
            "continue it or --force to start over (which deletes it)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        _, metrics = run.train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the last completed chunk is checkpointed. Resume with:\n"
            f"  bayesmeta fit --resume --run-dir {run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPT
    if metrics is not None:
        _print_summary(run_dir, metrics)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from bayesmeta.api import evaluate

    _print_summary(args.run_dir, evaluate(args.run_dir, args.set, progress=not args.no_progress))
    return 0


def _check_range(flag: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise ConfigError(f"{flag}: expected an integer >= {lo} and <= {hi}, got {value}")


def _check_sample_args(args: argparse.Namespace) -> None:
    """`sample`'s numeric options within range and --out a folder (exit 2 before anything is loaded)."""
    from bayesmeta.config import SEED_MAX

    _check_range("--samples", args.samples, 1, MAX_SAMPLES)
    _check_range("--steps", args.steps, 0, MAX_SAMPLE_STEPS)
    _check_range("--task-seed", args.task_seed, 0, SEED_MAX)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a file; expected a folder for sample_<n>.nc and .png")


def _sample(args: argparse.Namespace) -> int:
    from bayesmeta import registry
    from bayesmeta import sample as sampling
    from bayesmeta.api import Run

    _check_sample_args(args)
    cfg = registry.load_config(args.run_dir / "config.toml")
    fam = registry.make_family(cfg.eval.task, "eval.task")
    x_s = y_s = x = None
    if args.support is not None:  # the files are read before the checkpoint: a bad file fails fast
        x_s, y_s = sampling.read_support(args.support, fam.x_dim, fam.y_dim)
    if args.query is not None:
        x = sampling.read_query(args.query, fam.x_dim)
    run = Run.open(args.run_dir)
    for path in run.sample(
        x_s,
        y_s,
        x,
        task_seed=args.task_seed,
        samples=args.samples,
        inner_steps=args.steps,
        out=args.out,
        source=None if args.support is None else str(args.support),
    ):
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from bayesmeta.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(f"bayesmeta: usage error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "no_progress", False):  # batch jobs: timestamped lines instead of a bar
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
        logging.getLogger("jax").setLevel(logging.WARNING)  # not JAX's INFO lines on backends it probed
    from bayesmeta.datasets.omniglot import DataError
    from bayesmeta.fit import CheckpointError, NonFiniteError
    from bayesmeta.io import RunFolderError
    from bayesmeta.report import RunFileError
    from bayesmeta.sample import SupportFileError

    try:
        commands = {"fit": _fit, "evaluate": _evaluate, "sample": _sample, "report": _report}
        return commands[args.command](args)
    except ConfigError as e:
        print(f"bayesmeta: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (
        NonFiniteError,
        CheckpointError,
        RunFolderError,
        FileNotFoundError,
        SupportFileError,
        DataError,
        RunFileError,
    ) as e:
        print(f"bayesmeta: error: {e}", file=sys.stderr)
        return EXIT_RUN


if __name__ == "__main__":
    sys.exit(main())
