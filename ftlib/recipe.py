"""The training recipe, top to bottom: setup -> train -> evaluate -> export.

`run_recipe(cfg)` is what every mode runs: `--local` in this process, Slurm inside the job
function (launch/job.py). It resumes by itself from the newest complete checkpoint in the run
directory, so a requeued or re-invoked run continues where it stopped, with the same W&B run.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import RunConfig
from .storage import RunDir, atomic_write_json, atomic_write_text, read_json

COMPLETE_MARKER = "ftlib_complete.json"


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


@dataclass
class RunResult:
    run_dir: Path
    status: str                      # completed | interrupted | already-complete
    global_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    wandb_run_id: str | None = None
    resumed_from: str | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)   # the trained model, for callers in this process


# ---------------------------------------------------------------------------- distributed basics
def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def newest_complete_checkpoint(run: RunDir) -> Path | None:
    """Only checkpoints that carry ftlib's marker, written after Trainer finished saving them."""
    if not run.checkpoints.is_dir():
        return None
    candidates = sorted((p for p in run.checkpoints.glob("checkpoint-*") if p.is_dir()),
                        key=checkpoint_step, reverse=True)
    for path in candidates:
        if (path / COMPLETE_MARKER).exists():
            return path
    return None


def reset_run(run: RunDir) -> None:
    """training.overwrite_output_dir: forget checkpoints, artifacts and W&B id; start afresh."""
    for path in (run.checkpoints, run.artifacts, run.wandb, run.tensorboard):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run.manifest, run.state, run.root / "wandb_run_id"):
        path.unlink(missing_ok=True)


def reset_once(cfg: RunConfig) -> RunConfig:
    """Apply overwrite_output_dir now, in the launcher, and return the config for the workers.

    The returned config has the flag cleared: a requeued Slurm job or a second torchrun rank runs
    the same config again, and must resume from the new checkpoints, not wipe them a second time.
    """
    if not cfg.fresh_start:
        return cfg
    reset_run(RunDir(cfg.run_root))
    return replace(cfg, fresh_start=False)


# ---------------------------------------------------------------------------- callbacks
def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True when any process has the flag: ranks must stop at the same step or they deadlock."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _make_callbacks(run: RunDir, stop: StopRequest | None, log):
    from transformers import TrainerCallback

    class CompleteCheckpointMarker(TrainerCallback):
        """Trainer writes checkpoint-N/ in several files; the marker, written atomically after
        on_save, is what makes a checkpoint eligible for resume."""

        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank has written its part (ZeRO shards) before the marker
            if state.is_world_process_zero:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    atomic_write_json(path / COMPLETE_MARKER, {"step": state.global_step,
                                                               "time": time.time()})

    class Progress(TrainerCallback):
        """One plain line per logging step (Slurm logs are not terminals) and state.json."""

        def __init__(self) -> None:
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
            log(" | ".join(parts))
            prev = read_json(run.state, default={}) or {}
            prev.update({"step": state.global_step, "max_steps": state.max_steps, "tokens_per_s": tok_s,
                         "updated": time.time(), "status": "running"})
            for key in ("loss", "eval_loss"):
                if key in logs:
                    prev[key] = logs[key]
            atomic_write_json(run.state, prev)

    class StopOnRequest(TrainerCallback):
        """Preemption: finish the current optimizer step, save a complete checkpoint, stop."""

        def on_step_end(self, args, state, control, **kwargs):
            if stop is None:
                return control
            if _any_rank(stop.is_set()) and not stop.is_set():
                stop.set("another rank was signalled")
            if stop.is_set():
                log(f"stop requested ({stop.reason}): saving checkpoint at step {state.global_step}")
                control.should_save = True
                control.should_training_stop = True
            return control

    return [CompleteCheckpointMarker(), Progress(), StopOnRequest()]


# ---------------------------------------------------------------------------- the recipe
def quiet_progress_bars() -> None:
    """Progress bars turn Slurm log files into carriage-return soup; ftlib logs plain lines."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def training_arguments(cfg: RunConfig, run: RunDir, report_to: list[str]):
    import torch
    from transformers import TrainingArguments

    values: dict[str, Any] = {"logging_steps": 10, "save_strategy": "steps", "save_steps": 100,
                              "save_total_limit": 3, "seed": 42}
    values.update(cfg.training)
    values.update(output_dir=str(run.checkpoints), report_to=report_to or "none", run_name=cfg.name,
                  disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
                  include_num_input_tokens_seen=True, use_cpu=not torch.cuda.is_available())
    if values.get("gradient_checkpointing"):
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if cfg.distributed.strategy in ("ddp", "auto"):
        # LoRA leaves most parameters frozen; DDP must not wait for their gradients.
        values.setdefault("ddp_find_unused_parameters", False)
    return TrainingArguments(**values)


def write_run_files(cfg: RunConfig, run: RunDir) -> None:
    run.create()
    atomic_write_text(run.config, cfg.to_yaml())


def run_recipe(cfg: RunConfig, *, stop: StopRequest | None = None, callbacks: list | None = None,
               log=print) -> RunResult:
    from transformers import Trainer, set_seed

    from . import data as data_mod
    from . import model as model_mod
    from .export.publish import publish_artifacts
    from .provenance import record_start
    from .tracking import finish_tracking, start_tracking

    quiet_progress_bars()
    run = RunDir(cfg.run_root)
    main = is_main_process()
    if cfg.fresh_start and main:
        # Launchers reset once and hand workers and requeued jobs a config without the flag
        # (see reset_once); a direct caller of run_recipe gets the reset here.
        reset_run(run)
    if run.is_complete():
        log(f"run {run.root} is already complete (manifest.json present); nothing to do. "
            "Use another name=... or training.overwrite_output_dir=true to train again.")
        return RunResult(run.root, "already-complete")
    if cfg.storage.offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    model_path = model_mod.resolve_model_path(cfg)   # fails at once on an offline node with no copy
    if main:
        write_run_files(cfg, run)
    seed = int(cfg.training.get("seed", 42))
    set_seed(seed)

    tokenizer = model_mod.load_tokenizer(cfg, model_path)
    prepared = data_mod.prepare_data(cfg.data, tokenizer, seed=seed,
                                     cache_root=data_mod.data_cache_root(cfg.data, cfg.storage.root), log=log)
    if main:
        record_start(run, data_fingerprint=data_mod.cache_key(cfg.data, tokenizer, seed))

    from .distributed import prepare as prepare_strategy
    cfg = prepare_strategy(cfg, log=log if main else (lambda _: None))
    model = model_mod.build_training_model(cfg, model_path, local_rank=local_rank(), log=log)
    tracking = start_tracking(cfg, run, is_main=main, log=log)
    args = training_arguments(cfg, run, tracking.report_to)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      data_collator=data_mod.Collator(tokenizer.pad_token_id),
                      callbacks=_make_callbacks(run, stop, log) + tracking.callbacks + list(callbacks or []))
    resume = newest_complete_checkpoint(run)
    if resume is not None:
        log(f"resuming from {resume} (step {checkpoint_step(resume)})")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if args.world_size > 1:
        from .distributed import write_rank_report
        report = write_rank_report(trainer, run.root)
        if main:
            log(f"distributed: world size {report['world_size']}, backend {report['backend']}, "
                f"wrapper {report['wrapper']}, ZeRO stage {report['zero_stage']}")
    result = RunResult(run.root, "completed", trainer.state.global_step, output.training_loss,
                       wandb_run_id=tracking.wandb_run_id, resumed_from=str(resume) if resume else None,
                       model=trainer.model)
    if stop is not None and stop.is_set() and trainer.state.global_step < trainer.state.max_steps:
        result.status = "interrupted"
        if main:
            state = read_json(run.state, default={}) or {}
            atomic_write_json(run.state, dict(state, status="interrupted", step=trainer.state.global_step))
        finish_tracking(tracking, log=log)
        return result

    if prepared.eval is not None:
        result.eval_loss = trainer.evaluate().get("eval_loss")
        log(f"eval loss {result.eval_loss:.4f}")
    # Every rank takes part in saving (ZeRO-3 / FSDP gather the weights); only rank 0 writes.
    result.artifacts = publish_artifacts(cfg, run, trainer, tokenizer, model_path, log=log)
    if main and cfg.export.report:
        # Reloads the models from disk: a ZeRO-3 / FSDP model cannot run on one rank.
        from .report import write_report
        write_report(cfg, run.root, base_path=model_path, tokenizer=tokenizer, eval_dataset=prepared.eval,
                     log=log)
    if main:
        state = read_json(run.state, default={}) or {}
        atomic_write_json(run.state, dict(state, status="completed", step=trainer.state.global_step,
                                          max_steps=trainer.state.max_steps, train_loss=result.train_loss,
                                          eval_loss=result.eval_loss))
    finish_tracking(tracking, log=log)
    if tracking.sync_command() and main:
        log(f"W&B offline run; to upload it: {tracking.sync_command()}")
    return result
