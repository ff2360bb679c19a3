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
from .clean import clean_runs
from .config import ConfigError, RunConfig, load_config, print_notes
from .data import DataError
from .export.reexport import reexport
from .generate import generate
from .launch.local import run_local_plan
from .launch.slurm import render_plan, submit
from .plan import expand_runs, prepare_runs, refuse_live_jobs, without_finished
from .prefetch import prefetch
from .storage import DiskFull, LeaseHeld, RunDir
from .sync import sync_runs
from .validation import check_runs

EXIT_USAGE = 2
PROG: dict[str, str] = {}   # the program names --help shows; `ftlib SUB` sets "ftlib SUB"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the errors a user can fix into one line and exit status 2."""
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, DataError, LeaseHeld, DiskFull) as exc:
            return _fail(str(exc))
    return wrapper


# ---------------------------------------------------------------------------- submit
SUBMIT_EXAMPLES = """\
config sections (YAML, or key=value on the command line):
  model         name (hub id, local path, builtin:tiny-llama), method (qlora | lora | full), revision, dtype
  quantization  transformers' BitsAndBytesConfig fields (load_in_4bit, bnb_4bit_quant_type ...)
  lora          peft's LoraConfig fields (r, lora_alpha, target_modules: all-linear ...)
  training      transformers' TrainingArguments fields (learning_rate, max_steps, save_steps ...)
  data          train, eval, format (alpaca | chat | completion), chat_template, max_length, packing
  export        adapter, merged, gguf: [q8_0, q4_k_m ...], ollama, report
  slurm         partition, account, qos, time, nodes, gpus_per_node, gpu_type, mem, max_requeues, max_preemptions
  container     runtime (apptainer | enroot | charliecloud | none), image, binds, env
  tracking      backends (wandb, tensorboard, none), project, entity, mode (offline | online)
  storage       root (run directories), hf_cache, offline
  distributed   strategy (auto | ddp | deepspeed | fsdp), nproc (--local)
  sweep / tasks one Slurm array: a grid of overrides, or one adapter per task

examples:
  %(prog)s configs/tiny.yaml --local                       # a tiny QLoRA run on this CPU, ~1 minute
  %(prog)s configs/mistral.yaml --dry-run                  # resolved config, preflight, the sbatch script
  %(prog)s configs/mistral.yaml slurm.partition=gpu data.train=/shared/data/train.jsonl
  %(prog)s configs/mistral.yaml training.learning_rate=1e-4 --wait
"""


def submit_parser(prog: str = "submit.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Validate a run config and submit it to Slurm, or run it locally.",
        epilog=SUBMIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = submit_parser(PROG.get("submit", "submit.py")).parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"distributed.nproc={args.nproc}")
    cfg = load_config(args.config, overrides)
    runs = expand_runs(cfg)
    reports = check_runs(runs, slurm=not args.local, dry_run=args.dry_run)
    print_notes(cfg)
    if args.dry_run:
        return dry_run(cfg, runs, reports, local=args.local)
    refuse_live_jobs(runs)
    runs = without_finished(runs)
    if not runs:
        return 0
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
def status_parser(prog: str = "status.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Show the runs under a storage root: state, Slurm state, step, loss, "
                               "requeues, artifacts, W&B run and log; follow or cancel one.",
        epilog="examples:\n  %(prog)s --config configs/mistral.yaml\n  %(prog)s --root runs --json\n"
               "  %(prog)s --follow mistral-7b-qlora\n  %(prog)s cancel mistral-7b-qlora",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = status_parser(PROG.get("status", "status.py")).parse_args(argv)
    root = _storage_root(args)
    if args.follow or args.command == "cancel":
        name = args.follow or args.run
        if not name:
            return _fail("cancel needs a run name: status.py cancel RUN")
        run = _named_run(root, name)
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
    parser = argparse.ArgumentParser(prog=PROG.get("prefetch", "prefetch.py"),
                                     description="Download a config's model and hub datasets into the shared "
                                     "HF cache (run on a login node with internet).",
                                     epilog="example:\n  HF_TOKEN=... %(prog)s configs/llama3.yaml   # then submit "
                                            "with storage.offline=true",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from", dest="source", type=Path, metavar="DIR",
                        help="copy from DIR instead of the Hub: DIR/ORG/NAME/ holds a model repository, "
                             "DIR/datasets/ORG/NAME/ a dataset (e.g. git clones)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    prefetch(cfg, source=args.source)
    print(f"done; jobs with storage.offline=true read from {cfg.storage.hf_cache}")
    return 0


# ---------------------------------------------------------------------------- generate
def generate_parser(prog: str = "generate.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Generate from one base model with several LoRA adapters, "
        "switching adapters per prompt; writes JSONL and prints a side-by-side table.",
        epilog="examples:\n"
               "  %(prog)s --adapter tuned=runs/tiny --prompt 'Reverse the word.\\n\\napple'\n"
               "  %(prog)s --adapter a=runs/a --adapter b=runs/b --prompts prompts.jsonl --out gen.jsonl\n"
               "  %(prog)s --adapter tuned=runs/tiny --prompt 'Once upon a time' --raw --temperature 0.8 --seed 1\n"
               "prompts are rendered with each adapter's chat template (as in training) unless --raw",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model: hub id, local path or builtin:tiny-llama "
                                  "(default: the first adapter run's model.name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a run directory or an adapter directory, by name (repeat)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt for every adapter (repeat); rendered with the run's chat template")
    p.add_argument("--prompts", help='JSONL: {"adapter": NAME, "messages": [...]} or '
                                     '{"adapter": NAME, "prompt": "..."} a line')
    p.add_argument("--raw", action="store_true",
                   help="send prompt text as it is, not through the chat template training used")
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
    return generate(generate_parser(PROG.get("generate", "generate.py")).parse_args(argv))


# ---------------------------------------------------------------------------- export
def export_parser(prog: str = "export.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="(Re)make a finished run's exports (merged "
                                "model, GGUF, Ollama Modelfile) and its manifest from its config and adapter.",
                                epilog="examples:\n  %(prog)s runs/tiny\n  %(prog)s runs/tiny --gguf f16,q8_0 --ollama\n"
                                       "  %(prog)s runs/tiny --force --report",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory (<storage.root>/<name>)")
    p.add_argument("--gguf", metavar="TYPES", help="GGUF types, comma-separated (f16,bf16,q8_0,q4_k_m,...); "
                                                   "default: the run's export.gguf")
    p.add_argument("--ollama", action="store_true", help="also write the Ollama Modelfile")
    p.add_argument("--force", action="store_true", help="re-make every export even when complete")
    p.add_argument("--report", action="store_true", help="also write the run report (report.md)")
    return p



@guarded
def export_main(argv: list[str] | None = None) -> int:
    args = export_parser(PROG.get("export", "export.py")).parse_args(argv)
    reexport(args.run_dir, gguf=args.gguf, ollama=args.ollama, force=args.force, report=args.report)
    return 0


# ---------------------------------------------------------------------------- the ftlib command
COMMANDS = {"submit": "submit_main", "status": "status_main", "export": "export_main",
            "generate": "generate_main", "prefetch": "prefetch_main", "clean": "clean_main", "sync": "sync_main"}


def main(argv: list[str] | None = None) -> int:
    """`ftlib SUBCOMMAND ...`: the same entry points as jobs/*.py, one console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # By name: entry points defined further down this file (or added later) are found too.
    known = {name: globals()[func] for name, func in COMMANDS.items() if func in globals()}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in known:
        lines = ["usage: ftlib {" + ",".join(known) + "} ...", "",
                 "  ftlib submit configs/tiny.yaml --local     # = python jobs/submit.py configs/tiny.yaml --local",
                 "  ftlib status --root runs", "  ftlib SUBCOMMAND --help", ""]
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {', '.join(known)}", file=sys.stderr)
            return EXIT_USAGE
        print("\n".join(lines))
        return 0 if argv else EXIT_USAGE
    PROG[argv[0]] = f"ftlib {argv[0]}"
    return known[argv[0]](argv[1:])


# ---------------------------------------------------------------------------- clean and sync: runs under a root
def _add_run_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run names (default: every run under the root)")
    parser.add_argument("--root", help="storage root (default: storage.root of --config, else ./runs)")
    parser.add_argument("--config", help="take the storage root from this config")


def _storage_root(args: argparse.Namespace) -> Path:
    """The storage root of --root, else of --config's storage.root, else $FTLIB_STORAGE or ./runs."""
    if args.root:
        return Path(os.path.expanduser(args.root)).resolve()
    if args.config:
        return load_config(args.config).run_root.parent
    return Path(os.environ.get("FTLIB_STORAGE", "./runs")).resolve()


def _named_run(root: Path, name: str) -> RunDir:
    """The run `name` under root, or a one-line error listing the runs there."""
    run = RunDir(root / name)
    if not run.root.is_dir():
        known = ", ".join(r.name for r in status.find_runs(root)) or "none"
        raise ConfigError(f"no run named {name!r} under {root} (runs: {known}); pass --root or --config")
    return run


def _selected_runs(args: argparse.Namespace) -> tuple[Path, list[RunDir]]:
    """The storage root (as status finds it) and the named runs under it, or all of them."""
    root = _storage_root(args)
    if not args.runs:
        return root, status.find_runs(root)
    return root, [_named_run(root, name) for name in args.runs]


def _run_tool_parser(prog: str, description: str, examples: list[str], dry_run: str) -> argparse.ArgumentParser:
    """The parser of a tool over runs under a root (clean, sync): run selection and --dry-run."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_selection(parser)
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    return parser


def _over_selected_runs(args: argparse.Namespace, action) -> int:
    """The exit status of `action(runs)` over the selected runs; an empty root is said, not an error."""
    root, runs = _selected_runs(args)
    if not runs:
        print(f"no runs under {root}")
        return 0
    return action(runs)


# ---------------------------------------------------------------------------- clean
def clean_parser(prog: str = "clean.py") -> argparse.ArgumentParser:
    parser = _run_tool_parser(
        prog, "Prune the checkpoints of finished runs (manifest.json verified, state completed); artifacts, "
              "report and the final checkpoint stay. Other runs are left untouched.",
        ["%(prog)s --root runs --dry-run      # what would go, and how much space", "%(prog)s --root runs tiny",
         "%(prog)s --config configs/mistral.yaml --all-checkpoints"],
        dry_run="list exactly what would be removed; remove nothing")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-final", dest="keep_final", action="store_true", default=True,
                      help="keep each run's final checkpoint (the default)")
    keep.add_argument("--all-checkpoints", dest="keep_final", action="store_false",
                      help="remove the final checkpoint too")
    return parser


@guarded
def clean_main(argv: list[str] | None = None) -> int:
    args = clean_parser(PROG.get("clean", "clean.py")).parse_intermixed_args(argv)

    def clean(runs: list[RunDir]) -> int:
        clean_runs(runs, dry_run=args.dry_run, keep_final=args.keep_final)   # it returns the bytes freed
        return 0
    return _over_selected_runs(args, clean)


# ---------------------------------------------------------------------------- sync
def sync_parser(prog: str = "sync.py") -> argparse.ArgumentParser:
    return _run_tool_parser(
        prog, "Upload the offline W&B data of finished and running runs (wandb sync of each run's "
              "wandb/offline-run-* directories) from a machine with internet, and remember what was sent; "
              "status shows what is unsynced.",
        ["WANDB_API_KEY=... %(prog)s --root runs", "%(prog)s --config configs/mistral.yaml --dry-run",
         "%(prog)s --root runs tiny"],
        dry_run="show what wandb would sync; send and mark nothing")


@guarded
def sync_main(argv: list[str] | None = None) -> int:
    args = sync_parser(PROG.get("sync", "sync.py")).parse_intermixed_args(argv)
    return _over_selected_runs(args, lambda runs: sync_runs(runs, dry_run=args.dry_run))
