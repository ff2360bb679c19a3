"""Every check of a run that needs more than the config file, in one place, before any launch code
runs; --dry-run, --local and a Slurm submission go through the same function.

config.py has already checked names, types and combinations when the file was loaded (and
plan.expand_runs each sweep/task element's values). Here: files that must exist, the distributed
strategy against what is installed, GGUF types against the quantizer of the machine that will
run the export, the container image and launch (Slurm), and the preflight memory fit (Slurm, and
shown by --dry-run). Every refusal is a ConfigError: one line, exit status 2, nothing submitted.
"""
from __future__ import annotations

from .config import ConfigError, RunConfig
from .data import check_data_paths
from .distributed import check_strategy
from .export.gguf import check_gguf_types
from .launch.containers import check_container
from .launch.slurm import container_launch
from .preflight.check import preflight


def check_run(cfg: RunConfig, *, slurm: bool, dry_run: bool = False, with_data: bool = False) -> str:
    """Raise ConfigError for a run that cannot work; the preflight report when one is made.

    slurm: the run goes to Slurm (its container is checked); else it runs here (--local).
    dry_run: make the preflight report for --dry-run; with_data adds the training data's
    length statistics (tokenizes up to a few thousand rows of the user's data)."""
    check_data_paths(cfg.data, cfg.source)
    check_strategy(cfg)
    on_host = not slurm or cfg.container.runtime == "none"
    if cfg.export.gguf and on_host:
        # Inside a container the image's own llama.cpp quantizer is used (containers/ftlib.def).
        try:
            check_gguf_types(cfg.export.gguf)
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    if slurm:
        try:
            check_container(cfg.container, container_launch(cfg))
        except ValueError as exc:
            raise ConfigError(f"{cfg.source}: {exc}") from None
    if slurm or dry_run:
        # Refuses, before the queue, a run that cannot fit the GPU type asked for.
        return preflight(cfg, with_data=with_data)
    return ""


def check_runs(runs: list[RunConfig], *, slurm: bool, dry_run: bool = False) -> list[str]:
    """check_run for every run of a plan; the data statistics are made for the first run only
    (the elements of a sweep share their data)."""
    return [check_run(cfg, slurm=slurm, dry_run=dry_run, with_data=dry_run and i == 0)
            for i, cfg in enumerate(runs)]
