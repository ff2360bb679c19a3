"""Local mode (`--local`): run the recipe in this process (one GPU or the CPU), or in N processes
on this machine (`--nproc N`, launch/multiproc.py), for each run of the plan in turn."""
from __future__ import annotations

import sys

from ..config import ConfigError, RunConfig
from ..console import RunLog, record_failure
from ..data import DataError
from ..distributed import is_main_process
from ..recipe import RunResult, run_recipe
from ..storage import DiskFull, LeaseHeld, RunDir
from .multiproc import run_local_multiprocess


class RunFailed(RuntimeError):
    """A local run died; its traceback is in train.log and state.json says FAILED."""


def run_local(cfg: RunConfig) -> RunResult:
    """One run in this process, logging to its run directory's train.log (rank 0 only).

    A run that dies is marked FAILED in state.json with a one-line summary, and its traceback goes
    to train.log; the exception is raised again (a user error as itself: one line, exit 2)."""
    run = RunDir(cfg.run_root)
    log = RunLog(run.log if is_main_process() else None)
    log(f"run directory: {cfg.run_root}")
    try:
        result = run_recipe(cfg, log=log)
    except LeaseHeld:
        raise   # another job holds the run: its state.json is not this process's to mark
    except (ConfigError, DataError, DiskFull) as exc:
        if is_main_process():
            record_failure(run, exc, log.to_file, run.log)
        raise
    except Exception as exc:
        if not is_main_process():
            raise
        summary = record_failure(run, exc, log.to_file, run.log)
        raise RunFailed(f"run {cfg.name} failed: {summary}; the traceback is in {run.log}") from exc
    sys.stdout.flush()
    return result


def run_local_plan(runs: list[RunConfig]) -> int:
    """Every run of the plan (one, or each element of a sweep/tasks array) one after the other."""
    status = 0
    for i, cfg in enumerate(runs, start=1):
        if len(runs) > 1:
            print(f"local: run {i}/{len(runs)}: {cfg.name}", flush=True)
        if cfg.distributed.nproc > 1:
            status = run_local_multiprocess(cfg) or status
            continue
        try:
            result = run_local(cfg)
        except RunFailed as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            status = 1
            continue
        print(f"run {result.status}: {result.run_dir}", flush=True)
    return status
