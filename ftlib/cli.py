"""Every entry point's command line (jobs/*.py call these): parsing and printing only; the
decisions live in the modules they call. Every user error is one line on stderr and exit status 2.

    submit   config -> plan.expand_runs -> validation.check_runs -> --dry-run | launch.local | launch.slurm
    status   status.py (table, follow, cancel)
    prefetch prefetch.py          generate   generate.py          export   export/reexport.py
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from . import status
from .config import ConfigError, RunConfig, load_config, print_notes
from .data import DataError
from .export.reexport import reexport
from .generate import generate
from .launch.local import run_local_plan
from .launch.slurm import render_plan, submit
from .plan import expand_runs, prepare_runs
from .prefetch import prefetch
from .storage import RunDir
from .validation import check_runs

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the errors a user can fix into one line and exit status 2."""
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, DataError) as exc:
            return _fail(str(exc))
    return wrapper


# ---------------------------------------------------------------------------- submit
def submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submit.py", description="Validate a run config and submit it to Slurm, or run it locally.")
    parser.add_argument("config", help="YAML run config, e.g. configs/mistral.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.learning_rate=1e-4")
    parser.add_argument("--local", action="store_true", help="run here (one GPU or the CPU), not on Slurm; "
                        "a sweep's runs one after the other")
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
    cfg = load_config(args.config, overrides)
    runs = expand_runs(cfg)
    reports = check_runs(runs, slurm=not args.local, dry_run=args.dry_run)
    print_notes(cfg)
    if args.dry_run:
        return dry_run(cfg, runs, reports, local=args.local)
    if args.local:
        return run_local_plan(prepare_runs(runs))
    return submit(cfg, runs, wait=args.wait)


def dry_run(cfg: RunConfig, runs: list[RunConfig], reports: list[str], *, local: bool = False) -> int:
    print("# resolved config")
    print(cfg.to_yaml())
    for run, report in zip(runs, reports):
        print(f"# run directory: {run.run_root}")
        if report:
            print(report)
    if not local:
        print(render_plan(cfg, runs))
    return 0


# ---------------------------------------------------------------------------- status
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


# ---------------------------------------------------------------------------- prefetch
@guarded
def prefetch_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefetch.py", description="Download a config's model and hub "
                                     "datasets into the shared HF cache (run on a login node with internet).")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    prefetch(cfg)
    print(f"done; jobs with storage.offline=true read from {cfg.storage.hf_cache}")
    return 0


# ---------------------------------------------------------------------------- generate
def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py", description="Generate from one base model with several LoRA adapters, "
        "switching adapters per prompt; writes JSONL and prints a side-by-side table.")
    p.add_argument("--base", help="base model: hub id, local path or builtin:tiny-llama "
                                  "(default: the first adapter run's model.name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a run directory or an adapter directory, by name (repeat)")
    p.add_argument("--prompts", required=True, help='JSONL: {"adapter": NAME, "messages": [...]} or '
                                                    '{"adapter": NAME, "prompt": "..."} a line')
    p.add_argument("--out", help="write the generations here as JSONL")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (> 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, help="sampling seed, set before each prompt (with --temperature)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--load-in-4bit", action="store_true",
                   help="load the base in 4 bits (as QLoRA trained it) instead of the full dtype")
    p.add_argument("--hf-cache", help="HF cache (default: the adapter run's storage.hf_cache)")
    p.add_argument("--quiet", action="store_true", help="print no table")
    return p



@guarded
def generate_main(argv: list[str] | None = None) -> int:
    return generate(generate_parser().parse_args(argv))


# ---------------------------------------------------------------------------- export
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description="(Re)make a finished run's exports (merged "
                                "model, GGUF, Ollama Modelfile) and its manifest from its config and adapter.")
    p.add_argument("run_dir", help="the run directory (<storage.root>/<name>)")
    p.add_argument("--gguf", metavar="TYPES", help="GGUF types, comma-separated (f16,bf16,q8_0,q4_k_m,...); "
                                                   "default: the run's export.gguf")
    p.add_argument("--ollama", action="store_true", help="also write the Ollama Modelfile")
    p.add_argument("--force", action="store_true", help="re-make every export even when complete")
    p.add_argument("--report", action="store_true", help="also write the run report (report.md)")
    return p



@guarded
def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    reexport(args.run_dir, gguf=args.gguf, ollama=args.ollama, force=args.force, report=args.report)
    return 0
