"""Storage hygiene: prune the checkpoints of finished runs (jobs/clean.py).

A run is finished when its manifest.json verifies (every artifact present with its size and
sha256) and state.json says completed: it no longer resumes, so its checkpoints are only disk
space. Kept: artifacts/, the report, the manifest, config and logs, and the final (newest
complete) checkpoint unless --all-checkpoints. Any other run (queued, running, interrupted,
failed, with artifacts that do not verify, or whose directory a live job or export holds) is left
exactly as it is.

A dry run and a real clean make the same plan, so the dry run prints exactly the paths and sizes
the clean removes. A real clean holds the run's lease (locks.run_lease, as a training job or an
export does) while it plans and removes, so no job can start on the run in between; each
checkpoint leaves the checkpoint-N namespace in one rename before it is deleted (a kill leaves
no half checkpoint that still looks resumable).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .locks import live_holder, run_lease
from .storage import (LeaseHeld, RunDir, fsync_dir, human, newest_complete_checkpoint, read_json, tree_bytes,
                      verify_manifest)

DELETING_SUFFIX = ".deleting"   # storage's name for a checkpoint being deleted (clean_leftovers)


@dataclass
class Removal:
    path: Path
    size: int


@dataclass
class CleanPlan:
    run: RunDir
    removals: list[Removal] = field(default_factory=list)
    kept: Path | None = None           # the final checkpoint kept
    untouched: str | None = None       # why the run is not cleaned at all

    @property
    def size(self) -> int:
        return sum(r.size for r in self.removals)


def not_finished(run: RunDir) -> str | None:
    """Why the run must be left alone, or None when it is finished."""
    if not run.manifest.exists():
        return "not finished (no manifest.json)"
    status = (read_json(run.state, default={}) or {}).get("status")
    if status != "completed":
        return f"not finished (state.json status: {status or 'none'})"
    problems = verify_manifest(run)
    if problems:
        return f"artifacts do not verify against manifest.json ({problems[0]})"
    return None


def plan_clean(run: RunDir, *, keep_final: bool = True, holding_lease: bool = False) -> CleanPlan:
    """What cleaning `run` removes; reads only. holding_lease: the caller holds the run's lease
    (a clean), so the lease found there is ours, not a live job's."""
    plan = CleanPlan(run)
    holder = None if holding_lease else live_holder(run.lease)
    plan.untouched = f"in use by {holder.describe()}" if holder else not_finished(run)
    if plan.untouched or not run.checkpoints.is_dir():
        return plan
    plan.kept = newest_complete_checkpoint(run) if keep_final else None
    plan.removals = [Removal(p, tree_bytes(p)) for p in sorted(run.checkpoints.iterdir()) if p != plan.kept]
    return plan


def remove(path: Path) -> None:
    """A checkpoint directory out of its name in one rename, then deleted; anything else deleted."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    doomed = path
    if not path.name.endswith(DELETING_SUFFIX):
        doomed = path.with_name(f".{path.name}{DELETING_SUFFIX}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        fsync_dir(path.parent)
    shutil.rmtree(doomed)


def clean_run(run: RunDir, *, keep_final: bool = True) -> CleanPlan:
    """Plan and remove under the run's lease; the plan says what was removed (or why nothing)."""
    try:
        with run_lease(run, "clean"):
            plan = plan_clean(run, keep_final=keep_final, holding_lease=True)
            for removal in plan.removals:
                remove(removal.path)
            return plan
    except LeaseHeld as exc:
        return CleanPlan(run, untouched=str(exc))


def clean_runs(runs: list[RunDir], *, dry_run: bool = False, keep_final: bool = True, log=print) -> int:
    """Plan every run, print the plan (and apply it unless dry_run); returns the bytes (to be) freed."""
    verb = "would remove" if dry_run else "removed"
    total = count = 0
    for run in runs:
        plan = plan_clean(run, keep_final=keep_final) if dry_run else clean_run(run, keep_final=keep_final)
        if plan.untouched:
            log(f"{run.name}: untouched: {plan.untouched}")
            continue
        for removal in plan.removals:
            log(f"{run.name}: {verb} {removal.path} ({human(removal.size)})")
        if plan.kept:
            log(f"{run.name}: {'keeps' if plan.removals else 'nothing to remove; keeps'} the final "
                f"checkpoint {plan.kept.name}")
        elif not plan.removals:
            log(f"{run.name}: nothing to remove")
        total += plan.size
        count += len(plan.removals)
    log(f"{'would free' if dry_run else 'freed'} {human(total)} ({count} path(s))")
    return total
