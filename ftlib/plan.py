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
from .locks import live_holder
from .status import ENDED, sacct_states
from .locks import run_lease
from .storage import LeaseHeld, RunDir, atomic_write_text, free_bytes, human, read_json, reset_run


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
    """Reset (once) and write each run's files; the configs to hand to the jobs.

    A run whose directory a live job or export holds (its lease: locks.run_lease) is refused
    before anything is written, and each reset and config.yaml is written under the lease."""
    for cfg in runs:
        holder = live_holder(RunDir(cfg.run_root).lease)
        if holder is not None:
            raise ConfigError(f"run {cfg.name} ({cfg.run_root}) is in use by {holder.describe()}; wait for it "
                              "to end, cancel it, or choose another name=...")
    prepared = []
    for cfg in runs:
        run = RunDir(cfg.run_root)
        try:
            with run_lease(run, "submission"):
                cfg = reset_once(cfg)
                write_run_files(cfg, run)
        except LeaseHeld as exc:   # taken in the moment since the check above
            raise ConfigError(str(exc)) from None
        prepared.append(cfg)
    return prepared


def without_finished(runs: list[RunConfig], log=print) -> list[RunConfig]:
    """The runs that still have work to do. A finished run (its manifest is there) is left alone,
    saying how to train it again: a Slurm queue is a long wait for a job that would only say so."""
    todo = []
    for cfg in runs:
        if RunDir(cfg.run_root).is_complete() and not cfg.fresh_start:
            log(f"run {cfg.name} is already complete ({cfg.run_root}/manifest.json); nothing to do. To train "
                "again: training.overwrite_output_dir=true, or another name=...")
        else:
            todo.append(cfg)
    return todo


def refuse_live_jobs(runs: list[RunConfig]) -> None:
    """Two jobs must never train one run directory at once: refuse a run whose Slurm job is still
    queued or running (state.json's job id, asked of sacct)."""
    jobs = {cfg.name: str((read_json(RunDir(cfg.run_root).state, default={}) or {}).get("job_id") or "")
            for cfg in runs}
    states = sacct_states([j for j in jobs.values() if j])
    for cfg in runs:
        state = states.get(jobs[cfg.name], "")
        if state and state not in ENDED:
            raise ConfigError(f"run {cfg.name} already has Slurm job {jobs[cfg.name]} ({state}); follow it with "
                              f"python jobs/status.py --root {cfg.run_root.parent} --follow {cfg.name}, cancel it "
                              f"with python jobs/status.py --root {cfg.run_root.parent} cancel {cfg.name}, or "
                              "choose another name=...")


# ---------------------------------------------------------------------------- room a run needs
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q6_k": 0.82, "q5_k_m": 0.69,
                         "q4_k_m": 0.6, "q5_0": 0.69, "q5_1": 0.75, "q4_0": 0.5625, "q4_1": 0.625}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def space_needed(cfg: RunConfig, n_params: int, n_trainable: int) -> dict[str, int]:
    """Bytes the run writes under storage.root: the checkpoints kept (one more while the newest
    is saved, before the oldest goes: callbacks.py), the adapter, the merged model, GGUF files."""
    full = cfg.model.method == "full"
    dtype = cfg.export.merged_dtype if cfg.export.merged_dtype != "auto" else (cfg.model.dtype or "bfloat16")
    merged_bytes = n_params * DTYPE_BYTES.get(str(dtype), 2)
    optimizer = (2 if "8bit" in str(cfg.training.get("optim", "")) else 8) * n_trainable
    checkpoint = (merged_bytes if full else 4 * n_trainable) + optimizer + (1 << 20)   # + rng, scheduler
    keep = cfg.training.get("save_total_limit", 3) or 1
    out = {"checkpoints": int(checkpoint * (keep + 1)), "adapter": 0 if full else 4 * n_trainable,
           "merged": int(merged_bytes) if full or cfg.export.merged or cfg.export.gguf else 0,
           "gguf": int(sum(n_params * GGUF_BYTES_PER_WEIGHT.get(q.lower(), 2.0) for q in cfg.export.gguf))}
    out["total"] = sum(out.values())
    return out


def room_warning(cfg: RunConfig, n_params: int, n_trainable: int) -> str | None:
    """One warning line when the filesystem of storage.root has less room than the run writes."""
    need = space_needed(cfg, n_params, n_trainable)
    root = os.path.expanduser(cfg.storage.root)
    free = free_bytes(root)
    if free >= need["total"]:
        return None
    parts = ", ".join(f"{k} {human(v)}" for k, v in need.items() if k != "total" and v)
    return (f"warning: storage.root {root} has {human(free)} free; run {cfg.name} writes about "
            f"{human(need['total'])} ({parts}) and would stop with 'disk full': free space or choose "
            "another storage.root")
