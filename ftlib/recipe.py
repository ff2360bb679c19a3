"""The training recipe, top to bottom: setup -> train -> evaluate -> export.

`run_recipe(cfg)` is what every mode runs: `--local` in this process, Slurm inside the job
function (launch/job.py). It resumes by itself from the newest complete checkpoint in the run
directory, so a requeued or re-invoked run continues where it stopped, with the same W&B run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as data_mod
from . import model as model_mod
from .callbacks import StopRequest, bind_trainer, ftlib_callbacks
from .config import RunConfig
from .console import quiet_progress_bars
from .distributed import is_main_process, local_rank
from .distributed import prepare as prepare_strategy
from .distributed import write_rank_report
from .export.publish import publish_artifacts
from .locks import never_writable_by_others, run_lease
from .plan import write_run_files
from .provenance import record_start
from .report import write_report
from .storage import (RunDir, checkpoint_disk_full, checkpoint_step, clean_leftovers, discard_checkpoints_after,
                      newest_complete_checkpoint, reset_run, update_state)
from .tracking import finish_tracking, start_tracking


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


def checkpoints_to_keep(cfg: RunConfig) -> int | None:
    """training.save_total_limit (default 3); applied by ftlib's callbacks, not by the Trainer."""
    return cfg.training.get("save_total_limit", 3)


def training_arguments(cfg: RunConfig, run: RunDir, report_to: list[str]):
    import torch
    from transformers import TrainingArguments

    values: dict[str, Any] = {"logging_steps": 10, "save_strategy": "steps", "save_steps": 100,
                              "save_total_limit": 3, "seed": 42}
    values.update(cfg.training)
    values.update(output_dir=str(run.checkpoints), report_to=report_to or "none", run_name=cfg.name,
                  disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
                  include_num_input_tokens_seen=True, use_cpu=not torch.cuda.is_available())
    # ftlib deletes checkpoints beyond the limit itself, once the new one is marked complete
    # (callbacks.py): the Trainer deletes first, and a kill in between would leave none to resume.
    values["save_total_limit"] = None
    if values.get("activation_checkpointing"):
        values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    if cfg.distributed.strategy in ("ddp", "auto"):
        # LoRA leaves most parameters frozen; DDP must not wait for their gradients.
        values.setdefault("ddp_find_unused_parameters", False)
    return TrainingArguments(**values)


def run_recipe(cfg: RunConfig, *, stop: StopRequest | None = None, callbacks: list | None = None,
               log=print) -> RunResult:
    """One job per run directory: rank 0 holds the run's lease (locks.run_lease) from before its
    first write to the end; another job or export of the same run fails at once naming the holder."""
    never_writable_by_others()   # before W&B, TensorBoard or the Trainer writes a file of the run
    if not is_main_process():
        return _run_recipe(cfg, stop=stop, callbacks=callbacks, log=log)
    with run_lease(RunDir(cfg.run_root), "training", log=log):
        return _run_recipe(cfg, stop=stop, callbacks=callbacks, log=log)


def _run_recipe(cfg: RunConfig, *, stop: StopRequest | None, callbacks: list | None, log) -> RunResult:
    # transformers (with torch) is imported when training starts, not with the module: the CLI
    # imports the launchers, and `--dry-run`, status and error messages should not wait for it.
    from transformers import PrinterCallback, Trainer, set_seed

    quiet_progress_bars()
    run = RunDir(cfg.run_root)
    main = is_main_process()
    if cfg.fresh_start and main:
        # Launchers reset once and hand workers and requeued jobs a config without the flag
        # (see plan.reset_once); a direct caller of run_recipe gets the reset here.
        reset_run(run)
    if main:
        clean_leftovers(run, log)   # of a killed save or export (we hold the lease: nobody writes them)
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
    prepared = data_mod.prepare_data(cfg.data, tokenizer, seed=seed, hf_cache=model_mod.hf_cache_dir(cfg),
                                     cache_root=data_mod.data_cache_root(cfg.data, cfg.storage.root), log=log)
    if main:
        record_start(run, data_fingerprint=data_mod.cache_key(cfg.data, tokenizer, seed))

    cfg = prepare_strategy(cfg, log=log if main else (lambda _: None))
    model = model_mod.build_training_model(cfg, model_path, local_rank=local_rank(), log=log)
    tracking = start_tracking(cfg, run, is_main=main, log=log)
    args = training_arguments(cfg, run, tracking.report_to)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      data_collator=data_mod.Collator(tokenizer.pad_token_id),
                      callbacks=ftlib_callbacks(run, stop, log, checkpoints_to_keep(cfg)) + tracking.callbacks
                      + list(callbacks or []))
    # With disable_tqdm the Trainer prints every log dict raw; ftlib's progress lines say it once.
    trainer.remove_callback(PrinterCallback)
    bind_trainer(trainer)   # the loss carried across resumes reads the Trainer's accumulators
    resume = newest_complete_checkpoint(run, log=log if main else None)   # verified against its marker
    if main:
        discard_checkpoints_after(run, checkpoint_step(resume) if resume else -1, log=log)
    if resume is not None:
        log(f"resuming from {resume} (step {checkpoint_step(resume)})")
    with checkpoint_disk_full(run):   # a full disk: one line naming the checkpoint and the room
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if args.world_size > 1:
        report = write_rank_report(trainer, run.root)
        if main:
            log(f"distributed: world size {report['world_size']}, backend {report['backend']}, "
                f"wrapper {report['wrapper']}, ZeRO stage {report['zero_stage']}")
    result = RunResult(run.root, "completed", trainer.state.global_step,
                       output.metrics.get("train_loss", output.training_loss),
                       wandb_run_id=tracking.wandb_run_id, resumed_from=str(resume) if resume else None,
                       model=trainer.model)
    if stop is not None and stop.is_set() and trainer.state.global_step < trainer.state.max_steps:
        result.status = "interrupted"
        if main:
            update_state(run, status="interrupted", step=trainer.state.global_step)
        finish_tracking(tracking, log=log)
        return result

    if prepared.eval is not None:
        result.eval_loss = trainer.evaluate().get("eval_loss")   # the progress line shows it
    # Every rank takes part in saving (ZeRO-3 / FSDP gather the weights); only rank 0 writes.
    result.artifacts = publish_artifacts(cfg, run, trainer, tokenizer, model_path, log=log)
    if main and cfg.export.report:
        # Reloads the models from disk: a ZeRO-3 / FSDP model cannot run on one rank.
        write_report(cfg, run.root, base_path=model_path, tokenizer=tokenizer, eval_dataset=prepared.eval,
                     log=log)
    if main:
        update_state(run, status="completed", step=trainer.state.global_step, max_steps=trainer.state.max_steps,
                     train_loss=result.train_loss, eval_loss=result.eval_loss)
    finish_tracking(tracking, log=log)
    if tracking.sync_command() and main:
        log(f"W&B offline run; to upload it (login node): python jobs/sync.py --root {run.root.parent} {run.name}")
    return result
