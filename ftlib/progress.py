"""Training progress for people: one line per logging step (loss, eval loss, lr, tokens/s, ETA),
a live status line between them on a terminal, and in a log file (a Slurm job's output is a file)
a line every FTLIB_PROGRESS_S seconds (default 60) so a quiet stretch never looks like a hang.
Each line also goes to state.json, which `jobs/status.py` reads.
"""
from __future__ import annotations

import math
import os
import sys
import time

from .storage import RunDir, update_state

DEFAULT_EVERY_S = 60.0


def _eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if not math.isnan(seconds) else "?"


def progress_callback(run: RunDir, log, out=None):
    """The Trainer callback (made here: transformers is imported only when training starts)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.out = out or sys.stdout
            self.live = bool(getattr(self.out, "isatty", lambda: False)())
            self.every_s = float(os.environ.get("FTLIB_PROGRESS_S", DEFAULT_EVERY_S))
            self.t0 = time.time()
            self.step0 = self.tokens0 = 0
            self.last_line = time.time()

        def _rates(self, state) -> tuple[float, float]:
            elapsed = max(time.time() - self.t0, 1e-9)
            done = state.global_step - self.step0
            tok_s = (state.num_input_tokens_seen - self.tokens0) / elapsed
            eta = (state.max_steps - state.global_step) * elapsed / done if done else float("nan")
            return tok_s, eta

        def _print(self, line: str) -> None:
            if self.live:
                self.out.write("\r\033[K")   # clear the live status line first
            log(line)
            self.last_line = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0, self.tokens0 = time.time(), state.global_step, state.num_input_tokens_seen
            if state.is_world_process_zero:
                start = f" from step {state.global_step}" if state.global_step else ""
                self._print(f"training: {state.max_steps} steps{start}")

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            tok_s, eta = self._rates(state)
            line = f"step {state.global_step}/{state.max_steps} | {tok_s:,.0f} tok/s | ETA {_eta(eta)}"
            if self.live:
                self.out.write(f"\r\033[K{line}")
                self.out.flush()
            elif time.time() - self.last_line >= self.every_s:
                self._print(line)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            tok_s, eta = self._rates(state)
            if "train_loss" in logs:   # the Trainer's summary at the end of training
                loss = logs.get("train_loss")
                self._print(f"training done: {state.global_step - self.step0} steps in {time.time() - self.t0:.0f} s"
                            + (f", train loss {loss:.4g}" if isinstance(loss, float) else "")
                            + f", {tok_s:,.0f} tok/s")
                return
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if isinstance(logs.get(key), (int, float)):
                    parts.append(f"{key.replace('learning_rate', 'lr')} {logs[key]:.4g}")
            parts += [f"{tok_s:,.0f} tok/s", f"ETA {_eta(eta)}"]
            self._print(" | ".join(parts))
            update_state(run, step=state.global_step, max_steps=state.max_steps, tokens_per_s=tok_s,
                         updated=time.time(), status="running",
                         **{key: logs[key] for key in ("loss", "eval_loss") if key in logs})

        def on_train_end(self, args, state, control, **kwargs):
            if self.live:
                self.out.write("\r\033[K")
                self.out.flush()

    return Progress()
