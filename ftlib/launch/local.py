"""Local mode (`--local`): run the recipe in this process (one GPU or the CPU), or in N processes
on this machine (`--nproc N`, launch/multiproc.py), for each run of the plan in turn."""
from __future__ import annotations

import sys

from ..config import RunConfig
from ..console import RunLog
from ..distributed import is_main_process
from ..recipe import RunResult, run_recipe
from .multiproc import run_local_multiprocess


def run_local(cfg: RunConfig) -> RunResult:
    """One run in this process, logging to its run directory's train.log (rank 0 only)."""
    log = RunLog(cfg.run_root / "train.log" if is_main_process() else None)
    log(f"run directory: {cfg.run_root}")
    result = run_recipe(cfg, log=log)
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
        else:
            result = run_local(cfg)
            print(f"run {result.status}: {result.run_dir}", flush=True)
    return status
