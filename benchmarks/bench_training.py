#!/usr/bin/env python
"""ftlib's training vs the common QLoRA guide recipe, side by side in one invocation (issue 7).

    python benchmarks/bench_training.py [--short] [--steps N] [--batch B] [--out RESULTS.md]
    python benchmarks/bench_training.py --gpu [--out RESULTS-gpu.md]     # 7B-shaped Mistral, 4-bit

Two arms train the same model (same 4-bit base, same LoRA init seed), on the same examples, with
the same hyperparameters, for the same number of optimizer steps: the guide recipe (padded to
max_length, unpacked, loss on prompts too) and ftlib (packed, loss on responses only).

This file is the entry point: argument parsing, the plan (data drawn, tokenized and chosen, the
model resolved or, with --gpu, a Mistral-7B-shaped one built with random weights), running each
arm in a fresh child process (`--arm`, so memory and allocator state do not leak between arms,
ABBA order over --repeats) and writing the report. The parts live beside it:

  arms.py           the two arms (run_baseline, run_ftlib) and the child process's main
  fairness.py       choose_sizes / choose_examples (same N examples, exactly once, in exactly S
                    steps in both arms) and the meter that recognises every example in every batch
  report_writer.py  aggregate / derive / compare (figures, ratios, checks, target), machine_info,
                    versions and render_report (the Markdown of RESULTS.md)
  bench_data.py     the seeded alpaca-like data

Exit status 1 when a fairness check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
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

from arms import ARMS, child_main  # noqa: E402  (benchmarks/ is on sys.path from here on)
from fairness import choose_examples  # noqa: E402
from report_writer import (GPU_PEAK_BF16, RESULTS_TITLE, aggregate, compare, machine_info,  # noqa: E402
                           render_report, versions)

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
    # --gpu-smoke: the --gpu code path on CPU (what benchmarks/gpu_check.py --smoke runs): the same
    # config with fp32 compute (bf16 is ~6x slower on these CPUs) and a tiny Mistral-shaped stand-in.
    "gpu-smoke": dict(config="configs/mistral.yaml", model="random-mistral-stand-in", max_length=512,
                      steps=4, batch=4, heldout=4, repeats=1, threads=1,
                      overrides=["model.dtype=float32", "quantization.bnb_4bit_compute_dtype=float32",
                                 "training.bf16=false"]),
}

# A Mistral-7B-v0.1-shaped config; built with random weights, nothing is downloaded.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  sliding_window=4096, tie_word_embeddings=False)
# Its CPU stand-in for --gpu-smoke: the same proportions (intermediate 3.5 x hidden, 4 query heads
# per KV head, untied lm_head), 2 layers; widths are multiples of 64 (bitsandbytes' 4-bit blocks).
MISTRAL_STAND_IN = dict(vocab_size=1024, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096,
                        sliding_window=4096, tie_word_embeddings=False)
# model names the plan builds with random weights instead of resolving: (shape, device, dtype)
RANDOM_MODELS = {"random-mistral-7b": (MISTRAL_7B, "cuda", "bfloat16"),
                 "random-mistral-stand-in": (MISTRAL_STAND_IN, "cpu", "float32")}


# ============================================================================ helpers
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ============================================================================ the plan (parent process)
def build_random_mistral(path: Path, tokenizer, shape: dict | None = None, device: str = "cuda",
                         dtype: str = "bfloat16") -> Path:
    """A Mistral-7B-shaped model with random weights, saved like a downloaded one (~14.5 GB bf16);
    `shape` (e.g. MISTRAL_STAND_IN, on device "cpu" in float32) for another size. Kept when
    `path` already holds one (gpu_check's parts share it)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    if (path / "config.json").exists():
        return path
    config = MistralConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **(shape or MISTRAL_7B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    gc.collect()
    if torch.cuda.is_available():
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
    if args.mode in ("gpu", "gpu-smoke") and model_name in RANDOM_MODELS:
        from ftlib.tiny import build_tokenizer
        shape, device, dtype = RANDOM_MODELS[model_name]
        log(f"building {model_name} with random weights (no download) ...")
        model_name = str(build_random_mistral(work / model_name, build_tokenizer(), shape, device, dtype))

    base = [f"model.name={model_name}", f"storage.root={work / 'runs'}",
            f"storage.hf_cache={hf_cache}", f"data.train={train_file}", f"data.max_length={args.max_length}",
            "data.packing=true", "data.train_on_inputs=false", "data.validation_split=0",
            f"data.cache_dir={work / 'ftlib-data-cache'}", f"training.max_steps={args.steps}",
            "training.gradient_accumulation_steps=1", "training.eval_strategy=no",
            "training.save_strategy=no", "training.load_best_model_at_end=false",
            "training.overwrite_output_dir=true", "export.merged=false", "export.gguf=[]",
            "export.ollama=false", "tracking.backends=[none]"] + list(mode.get("overrides", []))
    cfg = load_config(REPO / mode["config"], base)
    model_path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, model_path)

    pool_size = max(4 * args.steps * args.batch, 2 * args.steps * args.batch + 200)
    rows = make_rows(pool_size, seed=args.seed, draw=args.draw)
    samples = [tokenize_sample(tokenizer, to_sample(row, cfg.data), cfg.data) for row in rows]
    for i, s in enumerate(samples):
        if all(label == FTLIB_IGNORE for label in s["labels"]):
            raise RuntimeError(f"generated row {i} has no response token within max_length")
    chosen, sizes = choose_examples([len(s["input_ids"]) for s in samples], args.steps, args.batch,
                                    args.max_length)
    train_rows, train_samples = [rows[i] for i in chosen], [samples[i] for i in chosen]
    assert len(pack(train_samples, args.max_length)) == sizes["packed_rows"]
    write_jsonl(train_file, train_rows)
    heldout_rows = make_rows(mode["heldout"] if args.heldout is None else args.heldout, seed=args.seed + 1,
                             draw=args.draw)
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
        "max_length": args.max_length, "sizes": sizes, "work_dir": str(work), "draw": args.draw,
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


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="a few optimizer steps (tests, smoke runs)")
    p.add_argument("--gpu", action="store_true", help="7B-shaped random Mistral in 4-bit at 2048 tokens, MFU; "
                                                      "skips with a message when CUDA is absent")
    p.add_argument("--gpu-smoke", action="store_true",
                   help="the --gpu code path on CPU: a tiny Mistral-shaped stand-in, fp32 compute "
                        "(MFU only with --peak-tflops)")
    p.add_argument("--steps", type=int, help="optimizer steps per arm")
    p.add_argument("--batch", type=int, help="about how many examples per optimizer step (both arms)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--model", help="model.name for both arms (e.g. builtin:tiny-llama-256 or a local path)")
    p.add_argument("--heldout", type=int, help="held-out examples")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--draw", choices=("long-tailed", "half-padded"), default="long-tailed",
                   help="bench_data's mix: long-tailed (~75%% padding at 512) or half-padded (~50%%)")
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
    args.mode = "gpu" if args.gpu else "gpu-smoke" if args.gpu_smoke else "short" if args.short else "cpu"
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
    if args.peak_tflops and (args.gpu or args.gpu_smoke):
        return args.peak_tflops * 1e12
    if not args.gpu:
        return None
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
