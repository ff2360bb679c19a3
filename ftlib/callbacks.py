"""Trainer callbacks: the completeness marker on checkpoints, progress lines, the stop request,
the loss carried across resumes, the non-finite loss stop and the hung-rank watchdog.

A preemption signal (launch/job.py) sets a StopRequest; StopOnRequest reads it at the end of the
optimizer step, so the checkpoint that follows is a whole step's, on every rank at the same step.

The Trainer keeps the loss of the steps since its last log line, and the sum over the logged
ones, in memory only: a resume started both at zero, so the first line after it averaged only
the steps since the resume and train_loss covered only the last start. LossCarry saves them into
each checkpoint (before its completeness marker) and puts them back on resume: the logged curve
and train_loss are the uninterrupted run's, bit for bit on CPU.

A NaN or inf loss (or gradients) stops training before that step's optimizer step, so neither the
weights nor any checkpoint ever hold that state (NonFiniteGuard). In a run of several processes, a
rank that makes no progress for training.ddp_timeout seconds (another rank hung or died inside a
collective) ends its process with a message naming the checkpoint the rerun resumes from
(StepWatchdog). A hung collective cannot be checkpointed from (the other rank holds half of it):
the periodic checkpoint is what the rerun resumes from.

The callback classes are made by `ftlib_callbacks` because their base class comes from
transformers, which is imported only when training starts (the CLI and status stay quick).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .distributed import any_rank, barrier, rank
from .progress import progress_callback
from .storage import (RunDir, atomic_write_json, mark_checkpoint_complete, newest_complete_checkpoint,
                      prune_checkpoints, read_json, update_state)

LOSS_STATE = "ftlib_loss-rank{rank}.json"   # in checkpoint-N/: the Trainer's loss accumulators
HUNG_EXIT_STATUS = 4                         # a rank saw no progress for most of training.ddp_timeout
WATCHDOG_POLL_S = 1.0
WATCHDOG_SHARE = 0.9   # of ddp_timeout: ahead of the collective's own timeout (a transport error)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients of a step are NaN or inf; raised before its optimizer step."""


class StopRequest:
    """Set from a signal handler (preemption, time limit); read at the next optimizer step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        # The first reason stands: USR2 before the time limit, then the limit's SIGTERM, must still
        # requeue.
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def ftlib_callbacks(run: RunDir, stop: StopRequest | None, log, keep_checkpoints: int | None = None) -> list:
    """The loss carry, marker, progress, stop, non-finite guard and watchdog callbacks for one
    run's Trainer (call bind_trainer(trainer) once the Trainer exists). keep_checkpoints is
    training.save_total_limit: ftlib, not the Trainer, deletes old checkpoints, and only once the
    new one is marked complete (the Trainer deletes before the marker: a kill between left none)."""
    from transformers import TrainerCallback

    class CompleteCheckpointMarker(TrainerCallback):
        """Trainer writes checkpoint-N/ in several files; the marker, written atomically after
        on_save, is what makes a checkpoint eligible for resume."""

        def on_save(self, args, state, control, **kwargs):
            barrier()  # every rank has written its part (ZeRO shards) before the marker
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_checkpoint_complete(path, state.global_step)
                    prune_checkpoints(run, keep_checkpoints, protect=state.best_model_checkpoint)

    class StopOnRequest(TrainerCallback):
        """Preemption: finish the current optimizer step, save a complete checkpoint, stop."""

        def __init__(self, stop: StopRequest | None, log) -> None:
            self.stop, self.log = stop, log

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.stop
            if stop is None:
                return control
            if any_rank(stop.is_set()) and not stop.is_set():
                stop.set("another rank was signalled")
            if stop.is_set():
                self.log(f"stop requested ({stop.reason}): saving checkpoint at step {state.global_step}")
                control.should_save = True
                control.should_training_stop = True
            return control

    # LossCarry first: its on_save writes into the checkpoint before the marker seals it, and its
    # on_log corrects train_loss before progress and W&B see it.
    return [loss_carry_callback(), CompleteCheckpointMarker(), progress_callback(run, log), StopOnRequest(stop, log),
            non_finite_guard(run, log), step_watchdog(run, log)]


def bind_trainer(trainer) -> None:
    """Give the callbacks that need the Trainer's own state (LossCarry) the Trainer."""
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "bind"):
            callback.bind(trainer)


def loss_carry_callback():
    """The Trainer's loss accumulators, saved in every checkpoint and restored on resume."""
    from transformers import TrainerCallback

    class LossCarry(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None

        def bind(self, trainer) -> None:
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            # Called after the Trainer zeroed its accumulators for this start (_inner_training_loop).
            if self.trainer is None or not state.global_step:
                return
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / LOSS_STATE.format(rank=rank())
            saved = read_json(path)
            # All ranks or none (a checkpoint of another world size, or of an older ftlib): ranks
            # that disagree on when they last logged would enter the log's gather alone.
            if any_rank(not saved):
                return
            trainer = self.trainer
            trainer._tr_loss.fill_(saved["pending"])   # in place: the Trainer holds this tensor
            trainer._total_loss_scalar = saved["total"]
            trainer._globalstep_last_logged = saved["last_logged"]

        def on_log(self, args, state, control, logs=None, **kwargs):
            # The Trainer divides the total over all steps by this start's steps only; the same
            # division over all steps is the uninterrupted run's value, bit for bit. The logs dict
            # is the Trainer's metrics (TrainOutput.metrics); later callbacks see the fixed value.
            if self.trainer is None or not logs or "train_loss" not in logs:
                return
            logs["train_loss"] = self.trainer._total_loss_scalar / max(state.global_step, 0.001)
            if state.log_history and "train_loss" in state.log_history[-1]:
                state.log_history[-1]["train_loss"] = logs["train_loss"]

        def on_save(self, args, state, control, **kwargs):
            trainer = self.trainer
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if trainer is None or not folder.is_dir():
                return
            # .item() of a float32 tensor is exact as a Python float, and JSON keeps it exactly.
            atomic_write_json(folder / LOSS_STATE.format(rank=rank()), {
                "step": state.global_step, "pending": float(trainer._tr_loss.item()),
                "total": trainer._total_loss_scalar, "last_logged": trainer._globalstep_last_logged})

    return LossCarry()



def non_finite_guard(run: RunDir, log):
    """Stop before the optimizer step of a step whose loss or gradients are NaN or inf."""
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        def __init__(self) -> None:
            self.bad_loss: float | None = None
            self.hook = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and self.hook is None:
                self.hook = model.register_forward_hook(self._watch_loss)

        def _watch_loss(self, module, inputs, output):
            loss = output.get("loss") if hasattr(output, "get") else None
            if module.training and loss is not None and not bool(loss.detach().isfinite().all()):
                self.bad_loss = float(loss.detach().float().sum())

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            bad_grads = 0
            # With fp16 a GradScaler skips a step with inf gradients by itself; the loss still counts.
            if model is not None and not args.fp16:
                bad_grads = sum(1 for p in model.parameters()
                                if p.grad is not None and not bool(p.grad.isfinite().all()))
            if not any_rank(self.bad_loss is not None or bad_grads > 0):
                return
            step = state.global_step + 1
            what = (f"the loss is {self.bad_loss}" if self.bad_loss is not None
                    else "the loss on another rank is not finite" if not bad_grads
                    else f"{bad_grads} gradient tensor(s) hold NaN or inf")
            newest = newest_complete_checkpoint(run)
            message = (f"training stopped at step {step}: {what}; no optimizer step and no checkpoint were "
                       f"taken from it ({newest.name if newest else 'no checkpoint yet'} is the newest). "
                       f"Lower training.learning_rate (now {args.learning_rate:g})"
                       + ("" if args.max_grad_norm else ", set training.max_grad_norm=1.0")
                       + (", or use bf16 instead of fp16 (fp16 overflows above 65504)" if args.fp16
                          else ", or check the data near this step (an empty or all-masked row)"))
            if state.is_world_process_zero:
                log(message)
                update_state(run, status="failed", error=f"NonFiniteLoss: {message}", step=state.global_step)
            raise NonFiniteLoss(message)

        def on_train_end(self, args, state, control, **kwargs):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None

    return NonFiniteGuard()


def step_watchdog(run: RunDir, log, exit_process=os._exit):
    """Several processes: a rank that sees no step, evaluation batch or save finish for 90% of
    training.ddp_timeout seconds ends its process. Another rank is hung (SIGSTOP, a dead node, a
    stuck collective): this one would wait in its collective until that timeout anyway, and then
    die with a transport error; the watchdog says instead what happened and where the rerun
    resumes. Time bound: 0.9 x ddp_timeout + WATCHDOG_POLL_S, plus the launcher's grace to kill
    the hung rank (torchrun: 30 s from SIGTERM to SIGKILL; under Slurm, srun needs
    --kill-on-bad-exit for that)."""
    from transformers import TrainerCallback

    class StepWatchdog(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()
            self.step = 0
            self.armed = threading.Event()
            self.thread: threading.Thread | None = None

        def _progress(self, state) -> None:
            self.last, self.step = time.monotonic(), state.global_step

        def on_train_begin(self, args, state, control, **kwargs):
            if args.world_size <= 1 or not args.ddp_timeout:
                return
            self._progress(state)
            self.armed.set()
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, args=(float(args.ddp_timeout),),
                                               name="ftlib-step-watchdog", daemon=True)
                self.thread.start()

        def on_step_end(self, args, state, control, **kwargs):
            self._progress(state)

        def on_prediction_step(self, args, state, control, **kwargs):
            self._progress(state)

        def on_save(self, args, state, control, **kwargs):
            self._progress(state)

        def on_train_end(self, args, state, control, **kwargs):
            self.armed.clear()

        def _watch(self, timeout_s: float) -> None:
            while True:
                time.sleep(WATCHDOG_POLL_S)
                idle = time.monotonic() - self.last
                if not self.armed.is_set() or idle < WATCHDOG_SHARE * timeout_s:
                    continue
                newest = newest_complete_checkpoint(run)
                message = (f"rank {rank()}: no training step finished for {idle:.0f} s after step {self.step} "
                           f"(limit: 90% of training.ddp_timeout={timeout_s:g} s): another rank is hung or "
                           f"gone; ending this process. The rerun resumes from "
                           f"{newest.name if newest else 'the start (no checkpoint yet)'}")
                log(message)
                if rank() == 0:
                    update_state(run, status="failed", error=f"hung rank: {message}")
                exit_process(HUNG_EXIT_STATUS)
                return

    return StepWatchdog()
