"""The plan step: a validated RunConfig -> the runs to make, and their run directories.

A config with a `sweep` (a grid of overrides) or `tasks` (one adapter per task on the same base)
stands for several runs, one run directory each and one W&B group; any other config is one run.
Every mode uses the same list: --local trains the runs one after the other in this process,
Slurm submits them as one job array (launch/slurm.py).

Before the first job starts, each run directory gets its resolved config.yaml, and
`training.overwrite_output_dir` is applied exactly once, here: the configs handed on have the flag
cleared, so a requeued job or a second rank resumes from the new checkpoints instead of wiping
them again.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, with_values
from .storage import RunDir, atomic_write_text, reset_run


def expand_runs(cfg: RunConfig) -> list[RunConfig]:
    """The runs of a sweep (grid of overrides) or of a task set; [cfg] otherwise."""
    if not cfg.sweep and not cfg.tasks:
        return [cfg]
    if cfg.sweep and cfg.tasks:
        raise ConfigError(f"{cfg.source}: sweep and tasks are both set; an array is one or the other")
    elements: list[tuple[str, dict[str, Any], str]] = []
    if cfg.sweep:
        keys = list(cfg.sweep)
        for key, values in cfg.sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{cfg.source}: sweep.{key}: expected a non-empty list of values")
        for i, combo in enumerate(itertools.product(*(cfg.sweep[k] for k in keys))):
            elements.append((f"{cfg.name}-{i}", dict(zip(keys, combo)), f"{cfg.source}: sweep"))
    else:
        for task, overrides in cfg.tasks.items():
            if overrides is not None and not isinstance(overrides, dict):
                raise ConfigError(f"{cfg.source}: tasks.{task}: expected a mapping of key: value overrides")
            elements.append((f"{cfg.name}-{task}", dict(overrides or {}), f"{cfg.source}: tasks.{task}"))
    runs = []
    for name, overrides, where in elements:
        element = with_values(cfg, overrides, where=where)
        tracking = replace(element.tracking, group=cfg.tracking.group or cfg.name)
        runs.append(replace(element, name=name, tracking=tracking, sweep={}, tasks={}))
    return runs


def array_folder(cfg: RunConfig) -> Path:
    """The submitit folder of an array: beside its runs, named after the base config."""
    return Path(os.path.expanduser(cfg.storage.root)).resolve() / f"{cfg.name}.array"


def reset_once(cfg: RunConfig) -> RunConfig:
    """Apply overwrite_output_dir now, in the launcher, and return the config for the workers."""
    if not cfg.fresh_start:
        return cfg
    reset_run(RunDir(cfg.run_root))
    return replace(cfg, fresh_start=False)


def write_run_files(cfg: RunConfig, run: RunDir) -> None:
    """The run directory and its config.yaml: exactly what runs."""
    run.create()
    atomic_write_text(run.config, cfg.to_yaml())


def prepare_runs(runs: list[RunConfig]) -> list[RunConfig]:
    """Reset (once) and write each run's files; the configs to hand to the jobs."""
    prepared = [reset_once(cfg) for cfg in runs]
    for cfg in prepared:
        write_run_files(cfg, RunDir(cfg.run_root))
    return prepared
