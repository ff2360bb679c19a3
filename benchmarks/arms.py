"""The two arms of the benchmark, each run in its own child process (child_main).

  baseline  the recipe of the common QLoRA guides: every example rendered with the chat template,
            tokenized with padding="max_length", no packing, labels = input_ids (padding -> -100
            by DataCollatorForLanguageModeling(mlm=False)), so the prompt carries loss too;
            AutoModelForCausalLM + BitsAndBytesConfig + prepare_model_for_kbit_training +
            get_peft_model + Trainer, written here without ftlib (only ftlib's CPU 4-bit numerics
            pin, model.keep_one_cpu_4bit_path, so both arms compute alike).
  ftlib     ftlib's own pipeline: ftlib.config.load_config(<config>, overrides) and
            ftlib.recipe.run_recipe, packing on, loss only on the responses.

Both take the plan (bench_training.make_plan) and the held-out examples, train with the meter of
fairness.make_meter and return its summary plus setup time, rows per step and trainable parameters.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fairness import make_meter

REPO = Path(__file__).resolve().parent.parent
ARMS = ("baseline", "ftlib")


def checkpointing_key(training: dict) -> str:
    """The config's name for gradient checkpointing: `activation_checkpointing` (transformers 5's
    name, ftlib's configs since the rename) or the older `gradient_checkpointing`."""
    return "gradient_checkpointing" if "gradient_checkpointing" in training else "activation_checkpointing"


def checkpointing_on(training: dict) -> bool:
    return bool(training.get(checkpointing_key(training)))


def run_baseline(plan: dict, heldout: list[dict], repeat: int = 0) -> dict[str, Any]:
    """The common QLoRA guide recipe, with the hyperparameters of the ftlib config."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed)

    from ftlib.model import keep_one_cpu_4bit_path

    t_start = time.perf_counter()
    datasets.disable_progress_bars()
    set_seed(plan["seed"])
    tokenizer = AutoTokenizer.from_pretrained(plan["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = plan["chat_template"]   # what ftlib renders with (data.chat_template)
    max_length = plan["max_length"]

    def to_text(row):
        prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input", "").strip() else row["instruction"]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    def tokenize(row):
        return tokenizer(to_text(row), truncation=True, max_length=max_length, padding="max_length")

    raw = datasets.load_dataset("json", data_files=plan["train_file"], split="train")
    train = raw.map(tokenize, remove_columns=raw.column_names)

    def dtype(name):
        return getattr(torch, name) if isinstance(name, str) else name
    quant = dict(plan["quantization"])
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if quant.get(key):
            quant[key] = dtype(quant[key])
    kwargs = dict(quantization_config=BitsAndBytesConfig(**quant), dtype=dtype(plan["model_dtype"]))
    if plan.get("attn_implementation"):
        kwargs["attn_implementation"] = plan["attn_implementation"]
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(plan["model_path"], **kwargs)
    # bitsandbytes repacks 4-bit weights on the first no-grad CPU forward (AVX512-BF16), which
    # changes later numerics; ftlib pins the plain path, and the baseline must match it.
    keep_one_cpu_4bit_path(model)
    model.config.use_cache = False
    training = dict(plan["training"])
    checkpointing = checkpointing_on(training)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **plan["lora"]))

    training.update(output_dir=str(Path(plan["work_dir"]) / "baseline-out"), report_to="none",
                    disable_tqdm=True, per_device_train_batch_size=plan["sizes"]["baseline_batch"],
                    save_strategy="no", eval_strategy="no", include_num_input_tokens_seen=True,
                    use_cpu=not torch.cuda.is_available())
    if checkpointing:
        training[checkpointing_key(training) + "_kwargs"] = {"use_reentrant": False}
    meter = make_meter(plan, heldout)
    trainer = Trainer(model=model, args=TrainingArguments(**training), train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[meter])
    trainer.train()
    out = meter.summary()
    out.update(setup_seconds=meter.train_begin_at - t_start, rows_per_step=plan["sizes"]["baseline_batch"],
               dataset_rows=len(train), trainable_parameters=sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad))
    return out


def run_ftlib(plan: dict, heldout: list[dict], repeat: int = 0) -> dict[str, Any]:
    from ftlib.config import load_config
    from ftlib.model import count_parameters
    from ftlib.recipe import run_recipe

    t_start = time.perf_counter()
    # A fresh run directory per repeat: run_recipe does nothing for a run that is already complete.
    cfg = load_config(REPO / plan["config"], plan["ftlib_overrides"] + [f"name=bench-ftlib-{repeat}"])
    meter = make_meter(plan, heldout)
    result = run_recipe(cfg, callbacks=[meter], log=lambda m: print(f"[ftlib] {m}", flush=True))
    out = meter.summary()
    stats_files = list(Path(plan["ftlib_data_cache"]).glob("*/stats.json"))
    stats = json.loads(stats_files[0].read_text()) if len(stats_files) == 1 else {}
    out.update(setup_seconds=meter.train_begin_at - t_start, rows_per_step=plan["sizes"]["ftlib_batch"],
               dataset_rows=stats.get("train_rows"), ftlib_train_samples=stats.get("train_samples"),
               ftlib_train_loss_tokens=stats.get("train_loss_tokens"), ftlib_status=result.status,
               trainable_parameters=count_parameters(result.model)[0])
    return out


def child_main(arm: str, plan_path: Path, result_path: Path, repeat: int = 0) -> None:
    plan = json.loads(plan_path.read_text())
    heldout = json.loads(Path(plan["heldout_file"]).read_text())
    import importlib

    import torch
    # Import the heavy libraries before any clock starts, the same for both arms.
    for module in ("datasets", "peft", "transformers", "ftlib.recipe"):
        importlib.import_module(module)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    out = (run_baseline if arm == "baseline" else run_ftlib)(plan, heldout, repeat)
    out["arm_seconds"] = time.perf_counter() - t0
    out["torch_threads"] = torch.get_num_threads()
    result_path.write_text(json.dumps(out, indent=1))
