#!/usr/bin/env python
"""ftlib's training vs the common QLoRA guide recipe, side by side in one invocation (issue 7).

    python benchmarks/bench_training.py [--short] [--steps N] [--batch B] [--out RESULTS.md]
    python benchmarks/bench_training.py --gpu [--out RESULTS-gpu.md]     # 7B-shaped Mistral, 4-bit

Two arms train the same model (same 4-bit base, same LoRA init seed), on the same examples, with
the same hyperparameters, for the same number of optimizer steps:

  baseline  the recipe of the common QLoRA guides: every example rendered with the chat template,
            tokenized with padding="max_length", no packing, labels = input_ids (padding -> -100
            by DataCollatorForLanguageModeling(mlm=False)), so the prompt carries loss too;
            AutoModelForCausalLM + BitsAndBytesConfig + prepare_model_for_kbit_training +
            get_peft_model + Trainer, written here without ftlib.
  ftlib     ftlib's own pipeline: ftlib.config.load_config(configs/tiny.yaml, overrides) and
            ftlib.recipe.run_recipe, packing on, loss only on the responses.

Fairness (asserted): each arm trains on every one of the same N examples exactly once (one epoch,
checked by recognising every example in every batch the model receives) in exactly S optimizer
steps, so both train the same response tokens. The baseline takes B = ceil(N/S) examples a step,
ftlib b = ceil(R/S) packed rows a step (R rows after packing); both average N/S examples a step.
N and the draw of examples are chosen (choose_examples) so that both arms need exactly S steps,
with N as near S x --batch as the data allows.

Measured per arm, each in its own fresh process (so memory and allocator state do not leak from
one arm into the other): training-loop wall time (Trainer on_train_begin -> on_train_end), useful
tokens/s (the response tokens of the examples consumed, counted with ftlib's masking for both
arms, over that time), total tokens/s (every position fed to the model, padding included), padding
fraction, peak memory (CPU: growth of the process's peak RSS during training, from the kernel's
VmHWM after resetting it through /proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated),
and the held-out loss per response token of the model before and after training (same held-out
examples, same code, response tokens only). GPU mode adds MFU.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

IGNORE_INDEX = -100
ARMS = ("baseline", "ftlib")

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; the first name that appears in the GPU's name wins.
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                 ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
                 ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]

MODES = {
    # config, model, max_length, optimizer steps, about how many examples per step, held-out
    # examples, repeats of both arms, torch threads per arm (0: torch's default). One thread on CPU:
    # on a shared machine a 2-thread OpenMP team stalls whenever another process takes a core
    # (steps measured here went from 0.15 s to 2-4 s), one thread only slows down in proportion.
    "cpu": dict(config="configs/tiny.yaml", model="builtin:tiny-llama", max_length=512, steps=60,
                batch=8, heldout=64, repeats=3, threads=1),
    "short": dict(config="configs/tiny.yaml", model="builtin:tiny-llama", max_length=512, steps=4,
                  batch=4, heldout=16, repeats=1, threads=1),
    # GPU: 16 examples a step, the guides' 4 per device x 4 accumulation (qlora-base.yaml), in one
    # micro-batch in both arms.
    "gpu": dict(config="configs/mistral.yaml", model="random-mistral-7b", max_length=2048, steps=20,
                batch=16, heldout=32, repeats=1, threads=0),
}

# A Mistral-7B-v0.1-shaped config; built with random weights, nothing is downloaded.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  sliding_window=4096, tie_word_embeddings=False)


# ============================================================================ shared helpers
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def choose_sizes(lengths: list[int], steps: int, batch: int, max_length: int,
                 max_deviation: float | None = None) -> dict[str, int] | None:
    """N (the first N of `lengths`), baseline batch B and ftlib packed rows per step b such that
    both arms consume the N examples exactly once in exactly `steps` optimizer steps.

    Rows are counted with ftlib's own packing plan (ftlib.data.pack_plan). Picks the N nearest
    steps * batch (ties: a multiple of steps, then the smaller); with max_deviation, only an N
    within that fraction of it (None when there is none). Raises when no N at all works.
    """
    from ftlib.data import pack_plan

    cut = [min(n, max_length) for n in lengths]
    target = steps * batch

    def sizes(n: int) -> dict[str, int] | None:
        b_base = math.ceil(n / steps)
        if math.ceil(n / b_base) != steps:   # cheap test first: packing is the costly part
            return None
        packed = len(pack_plan(cut[:n], max_length))
        if packed < steps:
            return None
        b_pack = math.ceil(packed / steps)
        if math.ceil(n / b_base) != steps or math.ceil(packed / b_pack) != steps:
            return None
        return {"examples": n, "baseline_batch": b_base, "packed_rows": packed, "ftlib_batch": b_pack,
                "steps": steps}

    # Nearest first: the first distance with a valid N decides (a full scan packs O(N) times).
    for distance in range(0, max(target, len(lengths)) + 1):
        if max_deviation is not None and distance > max(steps, max_deviation * target):
            return None
        found = [c for n in sorted({target - distance, target + distance}, key=lambda n: (n % steps != 0, n))
                 if steps <= n <= len(lengths) and (c := sizes(n)) is not None]
        if found:
            return found[0]
    raise ValueError(f"no example count up to {len(lengths)} gives both arms exactly {steps} steps; "
                     "generate more data or change --steps/--batch")


def choose_examples(lengths: list[int], steps: int, batch: int, max_length: int,
                    tries: int = 200) -> tuple[list[int], dict[str, int]]:
    """Which pool examples to train on (indices, in file order) and the sizes of choose_sizes.

    Equal steps and equal examples need N/S and R/S (R: packed rows) both just below integers, which
    the prefixes of one order rarely give near the requested batch. So this also tries seeded
    shuffles of the pool (every prefix of one is an i.i.d. draw of the generator) and keeps the draw
    whose N is nearest steps x batch (the unshuffled pool on ties); draws are told apart only by
    their packed-row count, never by content.
    """
    import random
    target = steps * batch
    best = None
    for attempt in range(tries):
        order = list(range(len(lengths)))
        if attempt:
            random.Random(attempt).shuffle(order)
        sizes = choose_sizes([lengths[i] for i in order], steps, batch, max_length, max_deviation=0.5)
        if sizes is not None and (best is None or abs(sizes["examples"] - target) < best[0]):
            best = (abs(sizes["examples"] - target), order[: sizes["examples"]], dict(sizes, shuffle_seed=attempt))
            if best[0] == 0:
                break
    if best is None:
        sizes = choose_sizes(lengths, steps, batch, max_length)
        return list(range(sizes["examples"])), dict(sizes, shuffle_seed=0)
    return best[1], best[2]


def example_key(ids) -> bytes:
    import numpy as np
    return np.asarray(ids, dtype=np.int64).tobytes()


def heldout_loss(model, heldout: list[dict]) -> float:
    """Mean negative log-likelihood per response token over the held-out examples (labels -100 on
    prompts and padding): ftlib's report code (report.held_out_loss), the same for both arms. Runs
    inside the training callbacks, so the model's train/eval mode is put back afterwards."""
    from ftlib.report import held_out_loss

    was_training = model.training
    try:
        # Length-sorted batches pad least; the padding id is masked out and never a target.
        return held_out_loss(model, sorted(heldout, key=lambda x: len(x["input_ids"])), pad_token_id=0)[0]
    finally:
        model.train(was_training)


def make_meter(plan: dict, heldout: list[dict]):
    """A TrainerCallback that times the training loop, measures peak memory, evaluates the model
    before and after, and records every example the model is fed (forward pre-hook)."""
    import torch
    from transformers import TrainerCallback

    expected: dict[bytes, list[int]] = {}     # key -> [multiplicity, response tokens]
    for ids, resp in zip(plan["example_ids"], plan["example_response_tokens"]):
        entry = expected.setdefault(example_key(ids), [0, resp])
        entry[0] += 1
    pad_id = plan["pad_token_id"]

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.consumed: dict[bytes, int] = {}
            self.counts = {"rows": 0, "positions": 0, "real_tokens": 0, "padding_tokens": 0,
                           "unknown_segments": 0, "loss_tokens": 0, "useful_tokens": 0, "forwards": 0}
            self.result: dict[str, Any] = {}
            self.handle = None

        # -- every training forward: which examples, how many tokens, how much padding
        def _hook(self, module, args, kwargs):
            if not module.training:
                return None
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            labels, mask, positions = kwargs.get("labels"), kwargs.get("attention_mask"), kwargs.get("position_ids")
            ids_cpu = ids.detach().cpu()
            c = self.counts
            c["forwards"] += 1
            c["rows"] += ids_cpu.shape[0]
            c["positions"] += ids_cpu.numel()
            if labels is not None:
                c["loss_tokens"] += int((labels[:, 1:] != IGNORE_INDEX).sum())
            pos_cpu = positions.detach().cpu() if positions is not None else None
            mask_cpu = mask.detach().cpu().bool() if mask is not None else None
            for r in range(ids_cpu.shape[0]):
                row = ids_cpu[r]
                if pos_cpu is not None:       # packed: a sample starts where position_ids is 0
                    starts = (pos_cpu[r] == 0).nonzero().flatten().tolist() + [row.shape[0]]
                    segments = [row[a:b] for a, b in zip(starts[:-1], starts[1:])]
                elif mask_cpu is not None:
                    segments = [row[mask_cpu[r]]]
                else:
                    segments = [row]
                real = 0
                for seg in segments:
                    key = example_key(seg.numpy())
                    if key in expected:
                        self.consumed[key] = self.consumed.get(key, 0) + 1
                        c["useful_tokens"] += expected[key][1]
                        real += seg.shape[0]
                    elif bool((seg == pad_id).all()):
                        pass                  # the collator's padding, its own "sample" when packed
                    else:
                        c["unknown_segments"] += 1
                        real += seg.shape[0]
                c["real_tokens"] += real
                c["padding_tokens"] += row.shape[0] - real
            return None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.train_begin_at = time.perf_counter()
            self.result["heldout_loss_before"] = heldout_loss(model, heldout)
            self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.result["gpu_memory_start"] = torch.cuda.memory_allocated()
            self.result["peak_rss_reset"] = reset_peak_rss()
            self.result["rss_start"] = proc_status("VmRSS")
            self.step_ends: list[float] = []
            self.cpu0 = time.process_time()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.result["gpu_memory_peak"] = torch.cuda.max_memory_allocated()
            self.result["train_seconds"] = time.perf_counter() - self.t0
            self.result["train_cpu_seconds"] = time.process_time() - self.cpu0
            edges = [self.t0] + self.step_ends
            self.result["step_seconds"] = [b - a for a, b in zip(edges[:-1], edges[1:])]
            self.result["peak_rss"] = proc_status("VmHWM")
            self.result["global_step"] = state.global_step
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.result["logged_train_losses"] = losses
            if self.handle is not None:
                self.handle.remove()
            self.result["heldout_loss_after"] = heldout_loss(model, heldout)

        def summary(self) -> dict[str, Any]:
            out = dict(self.result, **self.counts)
            out["examples_consumed"] = sum(self.consumed.values())
            out["distinct_consumed"] = len(self.consumed)
            out["exactly_once"] = (self.consumed == {k: v[0] for k, v in expected.items()})
            out["response_tokens_consumed"] = sum(expected[k][1] * n for k, n in self.consumed.items())
            return out

    return Meter()


# ============================================================================ the two arms (child processes)
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
    checkpointing = bool(training.get("gradient_checkpointing"))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **plan["lora"]))

    training.update(output_dir=str(Path(plan["work_dir"]) / "baseline-out"), report_to="none",
                    disable_tqdm=True, per_device_train_batch_size=plan["sizes"]["baseline_batch"],
                    save_strategy="no", eval_strategy="no", include_num_input_tokens_seen=True,
                    use_cpu=not torch.cuda.is_available())
    if checkpointing:
        training["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
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


# ============================================================================ the plan (parent process)
def build_random_mistral(path: Path, tokenizer) -> Path:
    """A Mistral-7B-shaped model with random weights, saved like a downloaded one (~14.5 GB bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    if (path / "config.json").exists():
        return path
    config = MistralConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **MISTRAL_7B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tmp.rename(path)
    return path


def make_plan(args, work: Path, hf_cache: Path) -> dict[str, Any]:
    from bench_data import length_summary, make_rows, write_jsonl
    from ftlib.config import load_config
    from ftlib.data import IGNORE_INDEX as FTLIB_IGNORE, pack, to_sample, tokenize_sample
    from ftlib.model import load_tokenizer, resolve_model_path

    mode = MODES[args.mode]
    model_name = args.model or mode["model"]
    train_file, heldout_file = work / "train.jsonl", work / "heldout.json"
    if args.mode == "gpu" and model_name == "random-mistral-7b":
        from ftlib.tiny import build_tokenizer
        log("building a Mistral-7B-shaped model with random weights (no download) ...")
        model_name = str(build_random_mistral(work / "random-mistral-7b", build_tokenizer()))

    base = [f"model.name={model_name}", f"storage.root={work / 'runs'}",
            f"storage.hf_cache={hf_cache}", f"data.train={train_file}", f"data.max_length={args.max_length}",
            "data.packing=true", "data.train_on_inputs=false", "data.validation_split=0",
            f"data.cache_dir={work / 'ftlib-data-cache'}", f"training.max_steps={args.steps}",
            "training.gradient_accumulation_steps=1", "training.eval_strategy=no",
            "training.save_strategy=no", "training.load_best_model_at_end=false",
            "training.overwrite_output_dir=true", "export.merged=false", "export.gguf=[]",
            "export.ollama=false", "tracking.backends=[none]"]
    cfg = load_config(REPO / mode["config"], base)
    model_path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, model_path)

    pool_size = max(4 * args.steps * args.batch, 2 * args.steps * args.batch + 200)
    rows = make_rows(pool_size, seed=args.seed)
    samples = [tokenize_sample(tokenizer, to_sample(row, cfg.data), cfg.data) for row in rows]
    for i, s in enumerate(samples):
        if all(label == FTLIB_IGNORE for label in s["labels"]):
            raise RuntimeError(f"generated row {i} has no response token within max_length")
    chosen, sizes = choose_examples([len(s["input_ids"]) for s in samples], args.steps, args.batch,
                                    args.max_length)
    train_rows, train_samples = [rows[i] for i in chosen], [samples[i] for i in chosen]
    assert len(pack(train_samples, args.max_length)) == sizes["packed_rows"]
    write_jsonl(train_file, train_rows)
    heldout_rows = make_rows(mode["heldout"] if args.heldout is None else args.heldout, seed=args.seed + 1)
    heldout = [tokenize_sample(tokenizer, to_sample(row, cfg.data), cfg.data) for row in heldout_rows]
    heldout_file.write_text(json.dumps([{"input_ids": h["input_ids"], "labels": h["labels"]} for h in heldout]))

    cfg = load_config(REPO / mode["config"],
                      base + [f"training.per_device_train_batch_size={sizes['ftlib_batch']}"])
    resp = [sum(1 for label in s["labels"] if label != FTLIB_IGNORE) for s in train_samples]
    lengths = [len(s["input_ids"]) for s in train_samples]
    return {
        "mode": args.mode, "config": mode["config"], "model": args.model or mode["model"],
        "model_path": model_path, "model_dtype": cfg.model.dtype if cfg.model.dtype != "auto" else "float32",
        "attn_implementation": cfg.model.attn_implementation, "quantization": cfg.quantization,
        "lora": cfg.lora, "training": cfg.training, "seed": int(cfg.training.get("seed", 42)),
        "chat_template": tokenizer.chat_template, "pad_token_id": tokenizer.pad_token_id,
        "max_length": args.max_length, "sizes": sizes, "work_dir": str(work),
        "train_file": str(train_file), "heldout_file": str(heldout_file),
        "ftlib_data_cache": str(work / "ftlib-data-cache"),
        "ftlib_overrides": base + [f"training.per_device_train_batch_size={sizes['ftlib_batch']}"],
        "example_ids": [s["input_ids"] for s in train_samples], "example_response_tokens": resp,
        "data_stats": {"tokens_per_example": length_summary(lengths),
                       "response_tokens_per_example": length_summary(resp),
                       "truncated": sum(1 for s in train_samples if s["full_length"] > args.max_length),
                       "heldout_examples": len(heldout),
                       "heldout_response_tokens": sum(sum(1 for l in h["labels"] if l != FTLIB_IGNORE)
                                                      for h in heldout)},
        "model_shape": model_shape(model_path),
    }


def model_shape(model_path: str) -> dict[str, int]:
    config = json.loads((Path(model_path) / "config.json").read_text())
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    matmul = layers * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * ff) + d * config["vocab_size"]
    return {"hidden_size": d, "intermediate_size": ff, "layers": layers, "heads": heads, "kv_heads": kv,
            "vocab_size": config["vocab_size"], "matmul_parameters": matmul}


def run_arm(arm: str, plan_path: Path, work: Path, timeout: float | None, repeat: int = 0,
            threads: int = 0) -> dict[str, Any]:
    result_path, log_path = work / f"{arm}-{repeat}.json", work / f"{arm}-{repeat}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log(f"arm {arm} (run {repeat + 1}): running (log {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--plan", str(plan_path),
                               "--result", str(result_path), "--repeat", str(repeat)],
                              stdout=handle, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"arm {arm} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    out = json.loads(result_path.read_text())
    out["process_seconds"] = time.perf_counter() - t0
    log(f"arm {arm}: {out['global_step']} steps in {out['train_seconds']:.1f} s, "
        f"{out['useful_tokens'] / out['train_seconds']:,.0f} useful tok/s, "
        f"held-out loss {out['heldout_loss_before']:.3f} -> {out['heldout_loss_after']:.3f}")
    return out


# ============================================================================ comparison and report
def aggregate(runs: list[dict]) -> dict[str, Any]:
    """One arm over repeats: the median times; the counts must agree between repeats."""
    import statistics
    out = dict(runs[0])
    for key in ("train_seconds", "train_cpu_seconds"):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeat_train_seconds"] = [r["train_seconds"] for r in runs]
    # Memory: the run with the median peak growth (its start and peak together).
    if "gpu_memory_peak" in runs[0]:
        growth = sorted(runs, key=lambda r: r["gpu_memory_peak"] - r["gpu_memory_start"])
        keys = ("gpu_memory_peak", "gpu_memory_start")
    else:
        growth = sorted(runs, key=lambda r: r["peak_rss"] - r["rss_start"])
        keys = ("peak_rss", "rss_start", "peak_rss_reset")
    out.update({k: growth[len(growth) // 2][k] for k in keys})
    out["exactly_once"] = all(r["exactly_once"] for r in runs)
    out["repeats_agree"] = all(r[k] == runs[0][k] for r in runs for k in
                               ("useful_tokens", "positions", "real_tokens", "global_step", "examples_consumed"))
    return out


def derive(plan: dict, r: dict, peak_flops: float | None) -> dict[str, Any]:
    seconds = r["train_seconds"]
    d = {
        "train_seconds": seconds,
        "repeat_train_seconds": r.get("repeat_train_seconds", [seconds]),
        "train_cpu_seconds": r["train_cpu_seconds"],
        "useful_tokens_per_cpu_s": r["useful_tokens"] / r["train_cpu_seconds"],
        "median_step_seconds": sorted(r["step_seconds"])[len(r["step_seconds"]) // 2] if r["step_seconds"] else None,
        "useful_tokens": r["useful_tokens"],
        "useful_tokens_per_s": r["useful_tokens"] / seconds,
        "total_tokens": r["positions"],
        "total_tokens_per_s": r["positions"] / seconds,
        "real_tokens": r["real_tokens"],
        "padding_fraction": r["padding_tokens"] / max(r["positions"], 1),
        "examples": r["examples_consumed"],
        "steps": r["global_step"],
        "rows_per_step": r["rows_per_step"],
        "loss_tokens": r["loss_tokens"],
        "heldout_loss_before": r["heldout_loss_before"],
        "heldout_loss_after": r["heldout_loss_after"],
        "torch_threads": r.get("torch_threads"),
        "setup_seconds": r.get("setup_seconds"),
    }
    if "gpu_memory_peak" in r:
        d["peak_memory_bytes"] = r["gpu_memory_peak"] - r["gpu_memory_start"]
        d["peak_memory_absolute_bytes"] = r["gpu_memory_peak"]
        d["peak_memory_kind"] = "GPU: max_memory_allocated during training minus allocated at its start"
    else:
        d["peak_memory_bytes"] = r["peak_rss"] - r["rss_start"]
        d["peak_memory_absolute_bytes"] = r["peak_rss"]
        d["peak_memory_kind"] = ("CPU: peak RSS during training (VmHWM, reset at train begin via "
                                 "/proc/self/clear_refs) minus RSS at train begin"
                                 if r.get("peak_rss_reset") else "CPU: process peak RSS (VmHWM, not reset) "
                                 "minus RSS at train begin")
    if peak_flops:
        shape = plan["model_shape"]
        lengths = [len(ids) for ids in plan["example_ids"]]
        # LoRA on a frozen base: forward 2N + backward through activations 2N per token (no weight
        # gradients for the base), plus 6 N_lora for the adapters; causal attention 2*l^2*d per layer
        # forward, x3 with backward. Padding is not counted (it is no useful work).
        flops = sum(4 * shape["matmul_parameters"] * l + 6 * shape["layers"] * shape["hidden_size"] * l * l
                    for l in lengths) + 6 * r["trainable_parameters"] * sum(lengths)
        d["model_flops"] = flops
        d["mfu"] = flops / seconds / peak_flops
    return d


def compare(plan: dict, results: dict[str, dict], peak_flops: float | None) -> dict[str, Any]:
    b, f = (derive(plan, results[arm], peak_flops) for arm in ARMS)
    checks = {
        "same_examples_exactly_once": bool(results["baseline"]["exactly_once"] and results["ftlib"]["exactly_once"]),
        "same_number_of_examples": b["examples"] == f["examples"] == plan["sizes"]["examples"],
        "same_response_tokens": (b["useful_tokens"] == f["useful_tokens"]
                                 == sum(plan["example_response_tokens"])),
        "same_optimizer_steps": b["steps"] == f["steps"] == plan["sizes"]["steps"],
        "no_unknown_segments": results["baseline"]["unknown_segments"] == results["ftlib"]["unknown_segments"] == 0,
        "ftlib_loss_only_on_responses": f["loss_tokens"] == f["useful_tokens"],
        "same_initial_model": abs(b["heldout_loss_before"] - f["heldout_loss_before"]) < 1e-3,
        "repeats_agree": all(results[arm].get("repeats_agree", True) for arm in ARMS),
    }
    ratios = {
        "useful_tokens_per_s": f["useful_tokens_per_s"] / b["useful_tokens_per_s"],
        "total_tokens_per_s": f["total_tokens_per_s"] / b["total_tokens_per_s"],
        "train_seconds": f["train_seconds"] / b["train_seconds"],
        "useful_tokens_per_cpu_s": f["useful_tokens_per_cpu_s"] / b["useful_tokens_per_cpu_s"],
        "padding_fraction": f["padding_fraction"] / b["padding_fraction"] if b["padding_fraction"] else None,
        "peak_memory": (f["peak_memory_bytes"] / b["peak_memory_bytes"]) if b["peak_memory_bytes"] > 0 else None,
        "heldout_loss_after": f["heldout_loss_after"] / b["heldout_loss_after"],
    }
    if peak_flops:
        ratios["mfu"] = f["mfu"] / b["mfu"]
    loss_ok = f["heldout_loss_after"] <= b["heldout_loss_after"] + LOSS_TOLERANCE
    target = {"useful_speedup_at_least_2x": ratios["useful_tokens_per_s"] >= 2.0,
              "heldout_loss_no_worse": loss_ok, "met": ratios["useful_tokens_per_s"] >= 2.0 and loss_ok,
              "loss_tolerance_nats": LOSS_TOLERANCE}
    return {"baseline": b, "ftlib": f, "ratios": ratios, "checks": checks, "target": target}


RESULTS_TITLE = "# Benchmark results: ftlib vs the QLoRA guide recipe\n\n"
LOSS_TOLERANCE = 0.01   # nats per response token: "no worse" allows this much run-to-run noise


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(info.pop("Flags", "").split())
    info["cpu_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["load_average"] = os.getloadavg()
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "ftlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        out["ftlib git"] = commit + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_report(plan: dict, cmp: dict, machine: dict, vers: dict, command: str, started: str,
                  load_after: tuple) -> str:
    b, f, ratio = cmp["baseline"], cmp["ftlib"], cmp["ratios"]
    sizes, stats = plan["sizes"], plan["data_stats"]
    tok, resp = stats["tokens_per_example"], stats["response_tokens_per_example"]
    gpu = "gpu" in machine

    def row(name, bv, fv, rv="") -> str:
        return f"| {name} | {bv} | {fv} | {rv} |"
    lines = [
        f"## ftlib training vs the QLoRA guide recipe: {plan['model']}" + (" (GPU)" if gpu else " (CPU)"),
        "",
        f"Measured {started} by `benchmarks/bench_training.py` (issue 7). Both arms ran in one invocation, "
        "one after the other, each in a fresh Python process, on the same machine.",
        "",
        "### Machine and versions",
        "",
        f"- CPU: {machine.get('Model name', '?')}, {machine.get('CPU(s)', machine['cpu_count'])} logical CPUs "
        f"({machine.get('Thread(s) per core', '?')} thread(s) per core), flags: {machine['cpu_flags'] or '-'}; "
        f"{machine.get('memory_gib', '?')} GiB memory; {machine['platform']}, Python {machine['python']}",
    ]
    if gpu:
        lines.append(f"- GPU: {machine['gpu']}")
    lines += [
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in machine['load_average'])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in load_after)} (the machine is shared: timings are noisy)",
        "- " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "### Setup",
        "",
        f"- Model `{plan['model']}` ({plan['model_shape']['layers']} layers, "
        f"hidden {plan['model_shape']['hidden_size']}, "
        f"vocab {plan['model_shape']['vocab_size']}), 4-bit "
        f"{plan['quantization'].get('bnb_4bit_quant_type', '')} (double quant "
        f"{plan['quantization'].get('bnb_4bit_use_double_quant')}, compute "
        f"{plan['quantization'].get('bnb_4bit_compute_dtype')}), LoRA r={plan['lora'].get('r')} "
        f"alpha={plan['lora'].get('lora_alpha')} on {plan['lora'].get('target_modules')}; hyperparameters from "
        f"`{plan['config']}` (lr {plan['training'].get('learning_rate')}, {plan['training'].get('lr_scheduler_type')}, "
        f"optim {plan['training'].get('optim')}, "
        f"gradient checkpointing {plan['training'].get('gradient_checkpointing')}, "
        f"seed {plan['seed']}), identical in both arms; max_length {plan['max_length']}.",
        f"- Data: `benchmarks/bench_data.py` (seeded, alpaca-like, long-tailed; pool shuffle seed "
        f"{sizes.get('shuffle_seed', 0)}, see choose_examples). The {sizes['examples']} training examples: "
        f"tokens per example mean {tok['mean']:.0f}, median {tok['p50']}, p90 {tok['p90']}, max "
        f"{tok['max']} ({stats['truncated']} truncated to {plan['max_length']}); response tokens per example mean "
        f"{resp['mean']:.0f}, median {resp['p50']}, p90 {resp['p90']}, max {resp['max']}. Held-out: "
        f"{stats['heldout_examples']} other examples, {stats['heldout_response_tokens']} response tokens.",
        f"- Fairness: both arms train on the same {sizes['examples']} examples, each exactly once, in "
        f"{sizes['steps']} optimizer steps, hence the same {b['useful_tokens']:,} response tokens. The baseline "
        f"takes {sizes['baseline_batch']} padded examples a step; ftlib packs the examples into "
        f"{sizes['packed_rows']} rows of at most {plan['max_length']} tokens and takes {sizes['ftlib_batch']} rows a "
        "step (same examples per step on average). The benchmark recognises every example in every batch the "
        "model receives and asserts all of this (checks below).",
        "- Useful tokens = response tokens (what carries loss in ftlib), counted the same way for both arms "
        "(ftlib's masking of the same examples). Total tokens = every position fed to the model, padding included. "
        "Time = the training loop (Trainer on_train_begin -> on_train_end), without data preparation or model "
        f"loading. Peak memory: {b['peak_memory_kind']}. Held-out loss = mean NLL per response token of the "
        "held-out examples (same code for both; before training both arms hold the same model).",
        f"- torch threads per arm: {b['torch_threads']}"
        + (" (one thread: on this shared machine a 2-thread OpenMP team stalls whenever another process "
           "takes a core)" if b["torch_threads"] == 1 and not gpu else "")
        + f"; {len(b['repeat_train_seconds'])} run(s) of each arm"
        + (" in ABBA order, times are medians" if len(b["repeat_train_seconds"]) > 1 else "") + ".",
        "",
        "### Results",
        "",
        "| | baseline (guide recipe) | ftlib | ftlib / baseline |",
        "| --- | ---: | ---: | ---: |",
        row("optimizer steps", b["steps"], f["steps"]),
        row("examples trained (each once)", b["examples"], f["examples"]),
        row("rows per step x max_length", f"{b['rows_per_step']} x {plan['max_length']} (padded)",
            f"{f['rows_per_step']} x {plan['max_length']} (packed)"),
        row("response (useful) tokens trained", f"{b['useful_tokens']:,}", f"{f['useful_tokens']:,}"),
        row("tokens fed to the model (incl. padding)", f"{b['total_tokens']:,}", f"{f['total_tokens']:,}",
            f"{f['total_tokens'] / b['total_tokens']:.3f}"),
        row("tokens carrying loss in the arm's own loss", f"{b['loss_tokens']:,}", f"{f['loss_tokens']:,}"),
        row("padding fraction", f"{b['padding_fraction']:.1%}", f"{f['padding_fraction']:.1%}"),
        row("training time" + (f" (median of {len(b['repeat_train_seconds'])} runs)"
                               if len(b["repeat_train_seconds"]) > 1 else ""),
            f"{b['train_seconds']:.1f} s", f"{f['train_seconds']:.1f} s", f"{ratio['train_seconds']:.3f}"),
        row("training time of each run", ", ".join(f"{x:.1f} s" for x in b["repeat_train_seconds"]),
            ", ".join(f"{x:.1f} s" for x in f["repeat_train_seconds"])),
        row("median optimizer step", f"{b['median_step_seconds']:.2f} s", f"{f['median_step_seconds']:.2f} s",
            f"{f['median_step_seconds'] / b['median_step_seconds']:.3f}"),
        row("CPU time of the process (all threads)", f"{b['train_cpu_seconds']:.1f} s",
            f"{f['train_cpu_seconds']:.1f} s", f"{f['train_cpu_seconds'] / b['train_cpu_seconds']:.3f}"),
        row("**useful tokens/s**", f"**{b['useful_tokens_per_s']:,.0f}**", f"**{f['useful_tokens_per_s']:,.0f}**",
            f"**{ratio['useful_tokens_per_s']:.2f}x**"),
        row("useful tokens per CPU-second", f"{b['useful_tokens_per_cpu_s']:,.0f}",
            f"{f['useful_tokens_per_cpu_s']:,.0f}", f"{ratio['useful_tokens_per_cpu_s']:.2f}x"),
        row("total tokens/s (incl. padding)", f"{b['total_tokens_per_s']:,.0f}", f"{f['total_tokens_per_s']:,.0f}",
            f"{ratio['total_tokens_per_s']:.2f}x"),
        row("peak memory growth during training", _mib(b["peak_memory_bytes"]), _mib(f["peak_memory_bytes"]),
            f"{ratio['peak_memory']:.2f}" if ratio["peak_memory"] else "-"),
        row("peak memory (absolute)", _mib(b["peak_memory_absolute_bytes"]), _mib(f["peak_memory_absolute_bytes"])),
        row("setup before training (data prep + model load)", f"{b['setup_seconds']:.1f} s",
            f"{f['setup_seconds']:.1f} s"),
        row("held-out loss / response token, before", f"{b['heldout_loss_before']:.4f}",
            f"{f['heldout_loss_before']:.4f}"),
        row("**held-out loss / response token, after**", f"**{b['heldout_loss_after']:.4f}**",
            f"**{f['heldout_loss_after']:.4f}**", f"{ratio['heldout_loss_after']:.3f}"),
    ]
    if "mfu" in f:
        lines.append(row("MFU (model FLOPs on real tokens / dense bf16 peak)", f"{b['mfu']:.1%}", f"{f['mfu']:.1%}",
                         f"{ratio['mfu']:.2f}x"))
    t = cmp["target"]
    lines += [
        "",
        "Checks (asserted by the benchmark): "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in cmp["checks"].items()),
        "",
        "Target (ftlib useful tokens/s >= 2x baseline, held-out loss no worse, within "
        f"{t['loss_tolerance_nats']} nats): "
        + ("**met**" if t["met"] else "**not met**")
        + f" (speed-up {ratio['useful_tokens_per_s']:.2f}x; held-out loss ftlib {f['heldout_loss_after']:.4f} vs "
          f"baseline {b['heldout_loss_after']:.4f}).",
        "",
    ]
    return "\n".join(lines)


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="a few optimizer steps (tests, smoke runs)")
    p.add_argument("--gpu", action="store_true", help="7B-shaped random Mistral in 4-bit at 2048 tokens, MFU; "
                                                      "skips with a message when CUDA is absent")
    p.add_argument("--steps", type=int, help="optimizer steps per arm")
    p.add_argument("--batch", type=int, help="about how many examples per optimizer step (both arms)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--model", help="model.name for both arms (e.g. builtin:tiny-llama-256 or a local path)")
    p.add_argument("--heldout", type=int, help="held-out examples")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--repeats", type=int, help="run both arms this many times (ABBA order); times are "
                                               "the median (default: 3 on CPU, 1 with --short or --gpu)")
    p.add_argument("--threads", type=int, help="torch threads per arm, 0 for torch's default "
                                               "(default: 1 on CPU, see MODES)")
    p.add_argument("--append", action="store_true", help="append the report to --out instead of replacing it")
    p.add_argument("--out", help="write the Markdown report here (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--json", help="write all measurements as JSON here")
    p.add_argument("--work-dir", help="scratch directory (default: a new temporary one, removed at the end)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not known")
    p.add_argument("--arm-timeout", type=float, default=None, help="seconds per arm before giving up")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mode = "gpu" if args.gpu else ("short" if args.short else "cpu")
    mode = MODES[args.mode]
    if args.gpu and args.short:
        mode = dict(mode, steps=4, batch=16, heldout=8)
    args.steps = args.steps or mode["steps"]
    args.batch = args.batch or mode["batch"]
    args.max_length = args.max_length or mode["max_length"]
    args.repeats = args.repeats or mode["repeats"]
    args.threads = mode["threads"] if args.threads is None else args.threads
    return args


def gpu_peak(args) -> float | None:
    if not args.gpu:
        return None
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    import torch
    name = torch.cuda.get_device_name(0)
    for key, peak in GPU_PEAK_BF16:
        if key in name:
            return peak
    log(f"unknown GPU '{name}': pass --peak-tflops to get MFU")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arm:
        child_main(args.arm, Path(args.plan), Path(args.result), args.repeat)
        return 0
    if args.gpu:
        import torch
        if not torch.cuda.is_available():
            print("bench_training --gpu: CUDA is not available on this machine; skipping the GPU benchmark "
                  "(run it where a GPU is visible; the CPU benchmark is the default mode).")
            return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(Path(__file__).resolve(), Path.cwd())] + sys.argv[1:])
    machine = machine_info()
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="ftlib-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_cache = Path(os.environ.get("FTLIB_HF_CACHE") or work / "hf-cache").resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        log(f"mode {args.mode}: planning in {work}")
        plan = make_plan(args, work, hf_cache)
        s = plan["sizes"]
        log(f"{s['examples']} examples, {s['steps']} steps: baseline {s['baseline_batch']} padded rows/step, "
            f"ftlib {s['ftlib_batch']} packed rows/step ({s['packed_rows']} rows)")
        plan_path = work / "plan.json"
        plan_path.write_text(json.dumps(plan))
        runs: list[dict[str, dict]] = []
        for repeat in range(args.repeats):
            # ABBA order: a slow drift of the machine's load does not favour one arm.
            order = ARMS if repeat % 2 == 0 else tuple(reversed(ARMS))
            runs.append({arm: run_arm(arm, plan_path, work, args.arm_timeout, repeat, args.threads)
                         for arm in order})
        results = {arm: aggregate([run[arm] for run in runs]) for arm in ARMS}
        cmp = compare(plan, results, gpu_peak(args))
        report = render_report(plan, cmp, machine, versions(), command, started, os.getloadavg())
        print(report)
        if args.out:
            previous = Path(args.out).read_text() if args.append and Path(args.out).exists() else ""
            Path(args.out).write_text((previous + "\n---\n\n" if previous else RESULTS_TITLE) + report)
            log(f"report -> {args.out}")
        if args.json:
            plan_out = {k: v for k, v in plan.items() if k not in ("example_ids",)}
            Path(args.json).write_text(json.dumps({"plan": plan_out, "results": results, "runs": runs,
                                                   "comparison": cmp, "machine": machine, "command": command},
                                                  indent=1))
        failed = [k for k, v in cmp["checks"].items() if not v]
        if failed:
            log(f"FAIRNESS CHECKS FAILED: {', '.join(failed)}")
            return 1
        return 0
    finally:
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
