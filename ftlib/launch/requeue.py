"""Requeue after preemption or a time limit: the marker, the batch script's trap, the restart budget.

The job may run in a container without Slurm's client, config or munge socket, so it never runs
`scontrol requeue` itself (as submitit's USR2 handler would): after saving a checkpoint it leaves
a marker file and exits; the batch script runs on the host, and its EXIT trap requeues the job
while the job is still running (the same call submitit makes from inside).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..storage import atomic_write_text

REQUEUE_MARKER_PREFIX = "requeue-"   # + the Slurm job id, in the plan folder (a run's slurm/)


class RequeueLimitExceeded(RuntimeError):
    pass


def requeue_marker(folder: Path, job_id: str) -> Path:
    """The file a job leaves to ask its batch script for a requeue (see requeue_trap)."""
    return Path(folder) / f"{REQUEUE_MARKER_PREFIX}{job_id}"


def ask_for_requeue(folder: Path | None) -> None:
    if folder is None:
        raise RuntimeError("this job was submitted without a requeue directory; resubmit it to resume")
    atomic_write_text(requeue_marker(folder, os.environ["SLURM_JOB_ID"]), "requeue\n")


def requeue_trap(folder: Path) -> list[str]:
    """Setup lines of the batch script: on exit, requeue the job if it left a requeue marker."""
    return [f"FTLIB_REQUEUE_MARKER={shlex.quote(str(folder))}/{REQUEUE_MARKER_PREFIX}$SLURM_JOB_ID",
            "trap 'if [ -e \"$FTLIB_REQUEUE_MARKER\" ]; then rm -f \"$FTLIB_REQUEUE_MARKER\"; "
            "echo \"ftlib: requeueing job $SLURM_JOB_ID, as the job asked\"; "
            "scontrol requeue \"$SLURM_JOB_ID\"; fi' EXIT"]


def restart_count() -> int:
    """How many times Slurm has restarted this job (requeues and node failures)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def check_restart_budget(run_name: str, checkpoints: Path, max_requeues: int) -> int:
    """The restart count; raises RequeueLimitExceeded past slurm.max_requeues, saying what to raise."""
    restarts = restart_count()
    if restarts > max_requeues:
        raise RequeueLimitExceeded(
            f"run {run_name} was requeued {restarts} times, more than slurm.max_requeues="
            f"{max_requeues}; its checkpoints are in {checkpoints}. Raise slurm.time or "
            f"slurm.max_requeues and submit again: it resumes from the newest checkpoint")
    return restarts
