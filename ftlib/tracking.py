"""Tracking: W&B (online or offline, files inside the run directory), TensorBoard, or none.

The W&B run id is stored in the run directory the first time and passed back on every restart
(requeue, preemption, a second local invocation), so one training run is one W&B run.

W&B never stops a job: when Slurm ends a job it sends SIGTERM to every process of the job,
wandb-core included, and the job still has a checkpoint to save after that. Metrics go through
a guarded WandbCallback, and finishing the run tolerates a service that is gone (quietly: no
traceback at exit).

W&B history across restarts. wandb-core exits at once on SIGTERM and buffers its transaction
log in 32 KiB blocks, so a preempted or killed start loses the rows it had not written yet, and
each start of an offline run writes its own offline-run-<time>-<id>/ directory (wandb creates
the file with O_EXCL: a start cannot append to an earlier start's file). ftlib makes those
directories add up to one run with every step once:
  * every row is logged at step = the Trainer's global step (not W&B's per-start counter), so
    the starts' rows never share a step;
  * a row waits until a complete checkpoint covers its step (a restart redoes the steps after
    the checkpoint, and would log them a second time);
  * a resumed start reads the earlier starts' .wandb files and first re-logs, from the
    checkpoint's log_history, the rows that none of them wrote to disk.
`wandb sync <run>/wandb/offline-run-*` replays the directories of one run id in start order, as
resumed instances of one run (wandb-core's runsync); their steps ascend across the directories.
"""
from __future__ import annotations

import contextlib
import copy
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
    # wandb's banner (version, "syncing is set to offline", the directory) repeats what ftlib's
    # own "tracking:" line below says; its warnings and errors still print.
    os.environ.setdefault("WANDB_SILENT", "true")
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
                    callbacks=[guarded_wandb_callback(log, run)])


def guarded_wandb_callback(log=print, run: RunDir | None = None):
    """transformers' WandbCallback, with every event guarded: after the first failure (the W&B
    service was killed) it says so once and stops sending; training and checkpointing go on.

    One W&B run however often the job restarts (see "W&B history" in the module docstring): each
    row is logged at step = the Trainer's global step; rows of steps not yet in a complete
    checkpoint wait (a restart would redo those steps and log them again), and a resumed start
    first re-logs, from the checkpoint's log history, the rows that no earlier start wrote to disk.
    """
    from transformers import TrainerCallback
    from transformers.integrations import WandbCallback

    class GuardedWandbCallback(TrainerCallback):
        def __init__(self) -> None:
            self.inner = WandbCallback()
            if getattr(self.inner, "_wandb", None) is not None:
                self.inner._wandb = _AtGlobalStep(self.inner._wandb)
            self.broken = False
            self.training = False
            self.pending: list[tuple[int, dict[str, Any]]] = []   # (step, logs) not yet in a checkpoint
            self.durable: set[int] = set()   # steps that earlier starts of this run wrote to disk
            self.saved = 0                   # the step of the newest complete checkpoint

        def _call(self, event: str, args, state, control, **kwargs):
            if self.broken:
                return None
            try:
                return getattr(self.inner, event)(args, state, control, **kwargs)
            except Exception as exc:  # wandb raises many kinds (ConnectionResetError, its own errors)
                self.broken = True
                log(f"tracking: W&B stopped at step {state.global_step} ({type(exc).__name__}: {exc}); "
                    "training goes on without it")
                return None

        def _send(self, args, state, control, rows) -> None:
            for step, logs in rows:
                if step in self.durable:   # an earlier start wrote it (a resume from an older checkpoint)
                    continue
                at_step = copy.copy(state)
                at_step.global_step = step
                self._call("on_log", args, at_step, control, logs=logs)

        def _flush(self, args, state, control, up_to: float) -> None:
            ready = [(s, logs) for s, logs in self.pending if s <= up_to]
            self.pending = [(s, logs) for s, logs in self.pending if s > up_to]
            self._send(args, state, control, ready)

        def on_train_begin(self, args, state, control, **kwargs):
            self._call("on_train_begin", args, state, control, **kwargs)
            self.training, self.saved = True, state.global_step
            if state.global_step and not self.broken:   # resumed: what did earlier starts keep?
                self.durable = durable_wandb_steps(run)
                missing = [(e["step"], _row(e)) for e in state.log_history
                           if e.get("step", 0) <= state.global_step and e.get("step") not in self.durable]
                if missing:
                    log(f"tracking: re-logging {len({s for s, _ in missing})} W&B row(s) up to step "
                        f"{state.global_step} that the previous start did not write to disk")
                self._send(args, state, control, missing)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.training:   # evaluation after training, or a direct call: send now
                return self._call("on_log", args, state, control, logs=logs, **kwargs)
            self.pending.append((state.global_step, dict(logs or {})))
            return None

        def on_save(self, args, state, control, **kwargs):
            # ftlib's marker callback ran before this one: checkpoint-<step> is complete.
            self.saved = state.global_step
            self._flush(args, state, control, up_to=state.global_step)
            return self._call("on_save", args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            finished = state.global_step >= state.max_steps
            # A stopped run keeps only the rows its last checkpoint covers (the stop saved one).
            self._flush(args, state, control, up_to=float("inf") if finished else self.saved)
            self.training = False
            if not finished and not self.broken:
                with contextlib.suppress(Exception):   # W&B shows the run as preempted, to be resumed
                    self.inner._wandb.run.mark_preempting()
            return self._call("on_train_end", args, state, control, **kwargs)

    def guarded(event: str):
        def call(self, args, state, control, **kwargs):
            return self._call(event, args, state, control, **kwargs)
        call.__name__ = event
        return call

    for event in (name for name in dir(TrainerCallback) if name.startswith("on_")):
        if event not in GuardedWandbCallback.__dict__:
            setattr(GuardedWandbCallback, event, guarded(event))
    return GuardedWandbCallback()


class _AtGlobalStep:
    """The wandb module as WandbCallback sees it, except that a row carrying train/global_step
    is logged at that step: W&B's own step counter restarts at 0 in every offline start, and rows
    of two starts would then share steps (a sync keeps one of them)."""

    def __init__(self, wandb_module) -> None:
        self._wandb = wandb_module

    def __getattr__(self, name: str):
        return getattr(self._wandb, name)

    def log(self, data, *args, **kwargs):
        if "train/global_step" in data and "step" not in kwargs and not args:
            kwargs["step"] = int(data["train/global_step"])
        return self._wandb.log(data, *args, **kwargs)


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    """A log_history entry as the logs dict the Trainer handed to on_log."""
    return {k: v for k, v in entry.items() if k != "step"}


# ---------------------------------------------------------------------------- W&B files on disk
_BLOCK = 32768          # wandb's transaction log is a LevelDB log: 32 KiB blocks of records
_HEADER = b":W&B"       # + magic 0xBEE1 (2 bytes) + version (1 byte)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file, in order, up to the first torn or damaged one (a killed
    wandb-core leaves its last block unwritten or half written)."""
    data = Path(path).read_bytes()
    if data[:4] != _HEADER:
        return
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:   # the writer pads a block's tail that cannot hold a record header
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:   # zero padding up to the block's end
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            return
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk


def wandb_history_steps(path: Path) -> list[int]:
    """The steps of the history rows in one .wandb file, in the order they were written."""
    from wandb.proto import wandb_internal_pb2
    steps = []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append(int(record.history.step.num))
    return steps


def offline_wandb_files(run: RunDir, run_id: str | None = None) -> list[Path]:
    """The run's offline .wandb files, oldest start first (the order `wandb sync` replays them)."""
    run_id = run_id or (run.root / RUN_ID_FILE).read_text().strip()
    return sorted(run.wandb.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")) if run.wandb.is_dir() else []


def durable_wandb_steps(run: RunDir | None) -> set[int]:
    """Steps already logged to W&B by earlier starts of this run: rows on disk in offline mode,
    or below the resumed run's next step online (the server has them)."""
    import wandb
    if wandb.run is None or run is None:
        return set()
    if not wandb.run.settings._offline:
        return set(range(int(wandb.run.step)))
    current = Path(wandb.run.settings.sync_file)
    return {step for path in offline_wandb_files(run, wandb.run.id) if path != current
            for step in wandb_history_steps(path)}


def finish_tracking(tracking: Tracking, log=print) -> None:
    if tracking.wandb_run_id is None:
        return
    import wandb
    if wandb.run is None:
        return
    try:
        wandb.finish()
    except Exception as exc:  # noqa: BLE001 - the service is gone: SIGTERM reaches every process of the job
        log(f"tracking: W&B run {tracking.wandb_run_id}: the W&B service stopped with the job "
            f"({type(exc).__name__}); the rows it had not written yet are re-logged from the "
            "checkpoint when the run resumes")
        # wandb's exit hook would try the dead service again and print a traceback at exit;
        # teardown unregisters it first, then fails the same way (quietly, here).
        with contextlib.suppress(Exception):
            wandb.teardown()
