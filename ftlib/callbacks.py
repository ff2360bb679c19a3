"""Trainer callbacks: the completeness marker on checkpoints, progress lines, and the stop request.

A preemption signal (launch/job.py) sets a StopRequest; StopOnRequest reads it at the end of the
optimizer step, so the checkpoint that follows is a whole step's, on every rank at the same step.

The callback classes are made by `ftlib_callbacks` because their base class comes from
transformers, which is imported only when training starts (the CLI and status stay quick).
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

from .distributed import any_rank, barrier
from .storage import RunDir, mark_checkpoint_complete, update_state


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


def ftlib_callbacks(run: RunDir, stop: StopRequest | None, log) -> list:
    """The marker, progress and stop callbacks for one run's Trainer."""
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

    class Progress(TrainerCallback):
        """One plain line per logging step (Slurm logs are not terminals) and state.json."""

        def __init__(self, run: RunDir, log) -> None:
            self.run, self.log = run, log
            self.t0 = None
            self.step0 = 0
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0, self.tokens0 = time.time(), state.global_step, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = max(time.time() - (self.t0 or time.time()), 1e-9)
            done = state.global_step - self.step0
            tokens = state.num_input_tokens_seen - self.tokens0
            tok_s = tokens / elapsed if tokens else 0.0
            eta = (state.max_steps - state.global_step) * elapsed / done if done else float("nan")
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    parts.append(f"{key.replace('learning_rate', 'lr')} {logs[key]:.4g}")
            parts.append(f"{tok_s:,.0f} tok/s")
            if not math.isnan(eta):
                parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            self.log(" | ".join(parts))
            update_state(self.run, step=state.global_step, max_steps=state.max_steps, tokens_per_s=tok_s,
                         updated=time.time(), status="running",
                         **{key: logs[key] for key in ("loss", "eval_loss") if key in logs})

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

    return [CompleteCheckpointMarker(), Progress(run, log), StopOnRequest(stop, log)]
