"""Requeue after preemption or a time limit: the marker, the batch script's trap, the restart budgets.

The job may run in a container without Slurm's client, config or munge socket, so it never runs
`scontrol requeue` itself (as submitit's USR2 handler would): after saving a checkpoint it leaves
a marker file and exits; the batch script runs on the host, and its EXIT trap requeues the job
while the job is still running (the same call submitit makes from inside).
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..storage import RunDir, atomic_write_text, update_state

REQUEUE_MARKER_PREFIX = "requeue-"   # + the Slurm job id, in the plan folder (a run's slurm/)
RESTARTS_KEY = "restarts"            # in state.json: Restarts.record(), + asked_at after a USR2


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


@dataclass(frozen=True)
class Restarts:
    """This start's restart counts, kept in state.json (the run directory survives requeues).

    Two budgets, because only one of them is the job's doing: a time-limit requeue is one the job
    asked for (USR2 near slurm.time, then the batch script's `scontrol requeue`); a preemption is a
    restart Slurm made on its own (SIGTERM from `scontrol requeue` or preemption, or no signal at
    all: a node failure). SLURM_RESTART_COUNT counts both."""

    job: str | None
    seen: int = 0          # SLURM_RESTART_COUNT of this start
    time_limit: int = 0
    preemption: int = 0

    @property
    def total(self) -> int:
        return self.time_limit + self.preemption

    def record(self) -> dict[str, Any]:
        return {"job": self.job, "seen": self.seen, "time_limit": self.time_limit, "preemption": self.preemption}


def count_restarts(state: dict[str, Any], job_id: str | None, restarts: int) -> Restarts:
    """The counts for a start with SLURM_RESTART_COUNT=`restarts`, from what earlier starts of the
    same Slurm job left in state.json. Pure: every rank of a start computes the same, whether or
    not rank 0 has already recorded this start."""
    earlier = state.get(RESTARTS_KEY) or {}
    if earlier.get("job") != job_id:   # a new submission starts with fresh budgets
        earlier = {}
    seen = int(earlier.get("seen", 0))
    time_limit, preemption = int(earlier.get("time_limit", 0)), int(earlier.get("preemption", 0))
    new = restarts - seen
    if new > 0:
        # Only the last start before this one can have asked; any start in between (killed before
        # it recorded itself) was ended by Slurm.
        asked = 1 if earlier.get("asked_at") == seen else 0
        time_limit += asked
        preemption += new - asked
    return Restarts(job_id, max(restarts, seen), time_limit, preemption)


def record_requeue_request(run: RunDir, restarts: Restarts) -> None:
    """Before asking the batch script for a requeue: the next start counts it as a time-limit one."""
    update_state(run, **{RESTARTS_KEY: dict(restarts.record(), asked_at=restarts.seen)})


def check_restart_budget(run_name: str, checkpoints: Path, restarts: Restarts, slurm) -> None:
    """Raise RequeueLimitExceeded naming the budget that ran out and what to raise."""
    again = f"its checkpoints are in {checkpoints}; submit again and it resumes from the newest checkpoint"
    if restarts.time_limit > slurm.max_requeues:
        raise RequeueLimitExceeded(
            f"run {run_name} was requeued {_times(restarts.time_limit)} at its time limit (slurm.time="
            f"{slurm.time}), more than slurm.max_requeues={slurm.max_requeues}: raise slurm.time (fewer "
            f"requeues) or slurm.max_requeues; {again}")
    limit = slurm.max_preemptions
    if limit is not None and restarts.preemption > limit:
        raise RequeueLimitExceeded(
            f"run {run_name} was restarted {_times(restarts.preemption)} by Slurm (preemption, scontrol "
            f"requeue or a node failure), more than slurm.max_preemptions={limit}: raise "
            f"slurm.max_preemptions (null: no limit), or find out why with sacct -j {restarts.job}; {again}")


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"
