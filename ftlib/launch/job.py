"""The job function that Slurm runs: a submitit Checkpointable around the recipe.

Preemption and time limits: Slurm sends USR2 `slurm.signal_delay_s` seconds before the end.
submitit's own handler would call checkpoint() in the middle of an optimizer step and run
`scontrol requeue` in the job process, which may be in a container without Slurm's client. ftlib
instead sets a flag, lets the Trainer finish the step and save a complete checkpoint, leaves a
requeue marker, and exits; the batch script, on the host, requeues the job (launch/requeue.py).
The requeued job resumes from that checkpoint with the same W&B run.

SIGTERM is what Slurm sends on `scontrol requeue`, on preemption without --signal, and on scancel,
KillWait seconds (30 by default) before SIGKILL. submitit ignores it; ftlib saves a checkpoint at
the end of the step and exits without asking for a requeue: Slurm itself requeues the job when
that is what it is doing, and a cancelled job stays cancelled. A node failure restarts from the
last periodic checkpoint.

Restart budgets (launch/requeue.py): requeues the job asked for at its time limit count against
slurm.max_requeues; restarts Slurm made on its own (SIGTERM or no signal: preemption, an admin's
requeue, a node failure) against slurm.max_preemptions. Both counts live in state.json.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import submitit

from ..callbacks import StopRequest
from ..config import RunConfig
from ..console import record_failure
from ..distributed import is_main_process
from ..recipe import run_recipe
from ..storage import LeaseHeld, RunDir, read_json, update_state
from .requeue import (ask_for_requeue, check_restart_budget, count_restarts, record_requeue_request,
                      restart_count)


SIGTERM_REASON = "signal SIGTERM"
INTERRUPTED_EXIT_STATUS = 3   # stopped early with a checkpoint; srun reports "exit code 3"


def _log(line: str) -> None:
    print(line, flush=True)


def slurm_job_id() -> str | None:
    """The id sacct knows this job by: ARRAYID_TASK for array elements."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def export_distributed_env() -> None:
    """Rank, world size and rendezvous from the Slurm allocation (never hand-set variables)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, cfg: RunConfig, requeue_dir: Path | None = None):
        self.cfg = cfg
        self.requeue_dir = requeue_dir   # where the batch script's trap looks for the marker

    def __call__(self) -> dict[str, Any]:
        cfg = self.cfg
        run = RunDir(cfg.run_root)
        export_distributed_env()
        restarts = count_restarts(read_json(run.state, default={}) or {}, os.environ.get("SLURM_JOB_ID"),
                                  restart_count())
        if is_main_process():
            update_state(run, status="running", requeues=restarts.total, restarts=restarts.record(),
                         job_id=slurm_job_id(), host=os.uname().nodename)
        stop = StopRequest()
        signal.signal(signal.SIGUSR2, lambda signum, frame: stop.set("signal SIGUSR2"))
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set(SIGTERM_REASON))
        _log(f"ftlib job: run {cfg.name} in {run.root}, Slurm job {os.environ.get('SLURM_JOB_ID')}, "
             f"restart {restarts.seen} ({restarts.time_limit} at the time limit, {restarts.preemption} by "
             "preemption or node failure)")
        try:
            check_restart_budget(cfg.name, run.checkpoints, restarts, cfg.slurm)
            result = run_recipe(cfg, stop=stop, log=_log)
        except Exception as exc:
            # submitit prints the traceback into the Slurm log; state.json says FAILED and why.
            if is_main_process() and not isinstance(exc, LeaseHeld):
                record_failure(run, exc, lambda _line: None)
            raise
        if result.status != "interrupted":
            return {"status": result.status, "run_dir": str(result.run_dir), "global_step": result.global_step,
                    "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                    "wandb_run_id": result.wandb_run_id}
        if not is_main_process():
            return {"status": "interrupted", "global_step": result.global_step}  # rank 0 decides
        if stop.reason == SIGTERM_REASON:
            _log(f"checkpoint saved at step {result.global_step}; Slurm is ending the job (SIGTERM): "
                 "a requeue resumes from this checkpoint")
        else:
            record_requeue_request(run, restarts)   # the next start counts it against slurm.max_requeues
            ask_for_requeue(self.requeue_dir)
            _log(f"checkpoint saved at step {result.global_step}; the batch script requeues the job")
        # No result file: the job is not over, and `submit --wait` must keep waiting (submitit
        # counts a job with a result file as done).
        sys.stdout.flush()
        sys.exit(INTERRUPTED_EXIT_STATUS)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Only reached if USR2 comes before __call__ installs ftlib's handler. The Trainer
        # checkpoints are on disk; resubmit ourselves unchanged.
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.requeue_dir))
