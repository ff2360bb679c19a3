"""The W&B callback never stops training: a dead W&B service is reported once and then skipped."""
from __future__ import annotations

from transformers import TrainerControl, TrainerState, TrainingArguments

from ftlib.tracking import guarded_wandb_callback


class DeadService:
    calls = 0

    def on_log(self, args, state, control, **kwargs):
        self.calls += 1
        raise ConnectionResetError("Connection lost")


def test_a_dead_wandb_service_is_reported_once_and_then_skipped(tmp_path):
    lines: list[str] = []
    callback = guarded_wandb_callback(log=lines.append)
    callback.inner = DeadService()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState()
    state.global_step = 12
    for _ in range(3):
        assert callback.on_log(args, state, TrainerControl(), logs={"loss": 1.0}) is None
    assert callback.inner.calls == 1 and callback.broken
    assert lines == ["tracking: W&B stopped at step 12 (ConnectionResetError: Connection lost); "
                     "training goes on without it"]
