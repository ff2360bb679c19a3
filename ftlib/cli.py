"""Command-line entry points; jobs/*.py call these. Parsing and printing only: decisions live in
the modules they call. Every user error is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import ConfigError, RunConfig, load_config, print_notes

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the errors a user can fix into one line and exit status 2."""
    def wrapper(argv: list[str] | None = None) -> int:
        from .data import DataError
        try:
            return main(argv)
        except (ConfigError, DataError) as exc:
            return _fail(str(exc))
    return wrapper


def load_checked(config: str, overrides: list[str]) -> RunConfig:
    """Config plus the checks that need the filesystem, all before any work or submission."""
    from .data import check_data_paths
    cfg = load_config(config, overrides)
    check_data_paths(cfg.data, cfg.source)
    from .distributed import check_strategy
    check_strategy(cfg)
    if cfg.export.gguf and cfg.container.runtime == "none":
        # Inside a container the image's own llama.cpp quantizer is used (containers/ftlib.def).
        try:
            from .export.gguf import check_gguf_types
            check_gguf_types(cfg.export.gguf)
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    print_notes(cfg)
    return cfg


def submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submit.py", description="Validate a run config and submit it to Slurm, or run it locally.")
    parser.add_argument("config", help="YAML run config, e.g. configs/mistral.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.learning_rate=1e-4")
    parser.add_argument("--local", action="store_true", help="run here (one GPU or the CPU), not on Slurm")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the plan; write and submit nothing")
    parser.add_argument("--nproc", type=int, default=None,
                        help="with --local: number of processes (torch.distributed on one machine)")
    parser.add_argument("--wait", action="store_true", help="wait for the Slurm job and return its exit status")
    return parser


@guarded
def submit_main(argv: list[str] | None = None) -> int:
    args = submit_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"distributed.nproc={args.nproc}")
    cfg = load_checked(args.config, overrides)
    if args.dry_run:
        return dry_run(cfg, local=args.local)
    if args.local:
        return run_local_mode(cfg)
    from .launch.preflight_check import preflight
    from .launch.slurm import submit
    preflight(cfg)   # refuses, before the queue, a run that cannot fit the GPU type asked for
    return submit(cfg, wait=args.wait)


def dry_run(cfg: RunConfig, *, local: bool = False) -> int:
    print("# resolved config")
    print(cfg.to_yaml())
    print(f"# run directory: {cfg.run_root}")
    from .launch.preflight_check import preflight
    print(preflight(cfg, with_data=True))
    if not local:
        from .launch.slurm import render_plan
        print(render_plan(cfg))
    return 0


def run_local_mode(cfg: RunConfig) -> int:
    from .recipe import reset_once
    cfg = reset_once(cfg)
    if cfg.distributed.nproc > 1:
        from .launch.multiproc import run_local_multiprocess
        return run_local_multiprocess(cfg)
    from .launch.local import run_local
    result = run_local(cfg)
    print(f"run {result.status}: {result.run_dir}")
    return 0


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="status.py", description="Show the runs under a storage root: Slurm state, step, loss, "
                                      "requeues, artifacts, W&B run and log; follow or cancel one.")
    parser.add_argument("command", nargs="?", default="list", choices=["list", "cancel"],
                        help="list (default) or cancel RUN")
    parser.add_argument("run", nargs="?", help="run name (for cancel)")
    parser.add_argument("--follow", metavar="RUN", help="print RUN's log as it grows until the job ends")
    parser.add_argument("--root", help="storage root (default: storage.root of --config, else ./runs)")
    parser.add_argument("--config", help="take the storage root from this config")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


@guarded
def status_main(argv: list[str] | None = None) -> int:
    import os
    from pathlib import Path

    from . import status
    from .storage import RunDir
    args = status_parser().parse_args(argv)
    if args.root:
        root = Path(os.path.expanduser(args.root)).resolve()
    elif args.config:
        root = load_config(args.config).run_root.parent
    else:
        root = Path(os.environ.get("FTLIB_STORAGE", "./runs")).resolve()
    if args.follow or args.command == "cancel":
        name = args.follow or args.run
        if not name:
            return _fail("cancel needs a run name: status.py cancel RUN")
        run = RunDir(root / name)
        if not run.config.exists():
            known = ", ".join(r.name for r in status.find_runs(root)) or "none"
            return _fail(f"no run named {name!r} under {root} (runs: {known}); pass --root or --config")
        if args.follow:
            status.follow(run)
            return 0
        try:
            job_id = status.cancel(run)
        except ValueError as exc:
            return _fail(str(exc))
        print(f"cancelled Slurm job {job_id} (run {name})")
        return 0
    rows = status.table(root)
    print(status.describe(rows) if args.json else (status.format_table(rows) if rows else f"no runs under {root}"))
    return 0


@guarded
def prefetch_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefetch.py", description="Download a config's model and hub "
                                     "datasets into the shared HF cache (run on a login node with internet).")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from .prefetch import prefetch
    cfg = load_config(args.config, args.overrides)
    prefetch(cfg)
    print(f"done; jobs with storage.offline=true read from {cfg.storage.hf_cache}")
    return 0
