"""Tracking: W&B (online or offline, files inside the run directory), TensorBoard, or none.

The W&B run id is stored in the run directory the first time and passed back on every restart
(requeue, preemption, a second local invocation), so one training run is one W&B run.

W&B never stops a job: when Slurm ends a job it sends SIGTERM to every process of the job,
wandb-core included, and the job still has a checkpoint to save after that. Metrics go through
a guarded WandbCallback, and finishing the run tolerates a service that is gone.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import RunConfig
from .storage import RunDir, atomic_write_text

RUN_ID_FILE = "wandb_run_id"
INIT_ATTEMPTS = 24
INIT_RETRY_S = 5


@dataclass
class Tracking:
    report_to: list[str]            # what HF Trainer reports to itself (W&B goes through callbacks)
    wandb_run_id: str | None = None
    wandb_dir: Path | None = None
    callbacks: list[Any] = field(default_factory=list)   # Trainer callbacks (the guarded W&B one)

    def sync_command(self) -> str | None:
        if self.wandb_dir is None:
            return None
        return f"wandb sync {self.wandb_dir}/offline-run-*-{self.wandb_run_id}"


def backends(cfg: RunConfig) -> list[str]:
    chosen = cfg.training.get("report_to") or cfg.tracking.backends
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    return [b for b in chosen if b not in ("none", None)]


def wandb_run_id(run: RunDir) -> str:
    path = run.root / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


def start_tracking(cfg: RunConfig, run: RunDir, *, is_main: bool, log=print) -> Tracking:
    chosen = backends(cfg)
    if "tensorboard" in chosen:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    if "wandb" not in chosen or not is_main:
        return Tracking(report_to=[b for b in chosen if b != "wandb" or is_main])
    import wandb
    run_id = wandb_run_id(run)
    # wandb writes into <dir>/wandb/, which is the run directory's wandb/ (DESIGN.md).
    os.environ["WANDB_DIR"] = str(run.root)
    # Trainer's WandbCallback would otherwise upload checkpoints as artifacts.
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    kwargs = dict(id=run_id, resume="allow", project=cfg.tracking.project, entity=cfg.tracking.entity,
                  group=cfg.tracking.group, tags=cfg.tracking.tags or None, name=cfg.name,
                  dir=str(run.root), mode=cfg.tracking.mode, config=cfg.to_dict(),
                  settings=wandb.Settings(console="off", x_disable_stats=True))
    for attempt in range(INIT_ATTEMPTS):
        try:
            wandb.init(**kwargs)
            break
        except Exception as exc:  # wandb raises its own ServerResponseError here
            # After a hard kill (scontrol requeue, node failure) the killed job's wandb-core can
            # outlive it for a while and still hold the run id; it exits once it sees its parent gone.
            if "in use" not in str(exc) or attempt == INIT_ATTEMPTS - 1:
                raise
            log(f"tracking: W&B run {run_id} is still held by the previous process; retrying in "
                f"{INIT_RETRY_S} s")
            time.sleep(INIT_RETRY_S)
    log(f"tracking: W&B run {run_id} ({cfg.tracking.mode}) in {run.wandb}")
    return Tracking(report_to=[b for b in chosen if b != "wandb"], wandb_run_id=run_id,
                    wandb_dir=run.wandb if cfg.tracking.mode == "offline" else None,
                    callbacks=[guarded_wandb_callback(log)])


def guarded_wandb_callback(log=print):
    """transformers' WandbCallback, with every event guarded: after the first failure (the W&B
    service was killed) it says so once and stops sending; training and checkpointing go on."""
    from transformers import TrainerCallback
    from transformers.integrations import WandbCallback

    class GuardedWandbCallback(TrainerCallback):
        def __init__(self) -> None:
            self.inner = WandbCallback()
            self.broken = False

    def guarded(event: str):
        def call(self, args, state, control, **kwargs):
            if self.broken:
                return None
            try:
                return getattr(self.inner, event)(args, state, control, **kwargs)
            except Exception as exc:  # wandb raises many kinds (ConnectionResetError, its own errors)
                self.broken = True
                log(f"tracking: W&B stopped at step {state.global_step} ({type(exc).__name__}: {exc}); "
                    "training goes on without it")
                return None
        call.__name__ = event
        return call

    for event in (name for name in dir(TrainerCallback) if name.startswith("on_")):
        setattr(GuardedWandbCallback, event, guarded(event))
    return GuardedWandbCallback()


def finish_tracking(tracking: Tracking, log=print) -> None:
    if tracking.wandb_run_id is None:
        return
    import wandb
    if wandb.run is None:
        return
    try:
        wandb.finish()
    except Exception as exc:  # the service is gone (SIGTERM to the whole job): the files are on disk
        log(f"tracking: W&B run {tracking.wandb_run_id} not finished cleanly ({type(exc).__name__}: {exc})")
