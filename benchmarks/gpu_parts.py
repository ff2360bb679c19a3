"""gpu_check's first three parts: environment, correctness, and the benchmark's GPU arm.

Each part function takes gpu_check.Context, fills ctx.result (saving it as it goes, so a part cut
at its deadline keeps what it measured) and returns (status, note): status "ok" when all its
checks hold, "failed" otherwise. On CPU (--smoke) the same code runs with fp32 compute and tiny
shapes; only what cannot exist there is skipped (GPU name, driver).
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf",
            "safetensors", "tokenizers", "huggingface_hub", "triton", "liger_kernel", "pyarrow", "fsspec",
            "dill", "multiprocess", "numpy", "pytest")
NOT_NEEDED = ("wandb", "deepspeed", "submitit", "gguf")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ============================================================================ environment
def part_environment(ctx) -> tuple[str, str]:
    import importlib
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    r = ctx.result
    r["python"], r["platform"], r["cpu_count"] = platform.python_version(), platform.platform(), os.cpu_count()
    r["versions"], r["import_errors"] = {}, {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what we record
            r["versions"][name] = None
            r["import_errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        try:
            r["versions"][name] = str(getattr(module, "__version__", None) or version(name.replace("_", "-")))
        except PackageNotFoundError:
            r["versions"][name] = "?"
    r["missing"] = sorted(n for n, v in r["versions"].items() if v is None)
    r["not_needed_importable"] = {n: importlib.util.find_spec(n) is not None for n in NOT_NEEDED}
    ctx.save()
    import torch
    r["cuda_available"] = torch.cuda.is_available()
    r["torch_cuda"] = torch.version.cuda
    if r["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        r["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                    "bf16_supported": torch.cuda.is_bf16_supported()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            r["gpu"]["nvidia_smi"] = smi.stdout.strip()
            r["gpu"]["driver"] = smi.stdout.strip().split(",")[-1].strip() if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError) as exc:
            r["gpu"]["driver"] = None
            r["gpu"]["nvidia_smi"] = f"not run: {exc}"
    else:
        r["gpu"] = None
    needed = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf"]
    missing = [n for n in needed if r["versions"].get(n) is None]
    problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
               ([] if r["cuda_available"] or ctx.smoke else ["CUDA is not available"])
    return ("failed", "; ".join(problems)) if problems else ("ok", r["gpu"]["name"] if r["gpu"] else "CPU (smoke)")


# ============================================================================ correctness
def _tiny_config(ctx, steps: int):
    from ftlib.config import load_config
    over = [f"storage.root={ctx.work / 'correctness-runs'}", f"storage.hf_cache={ctx.work / 'hf-cache'}",
            f"data.train={REPO / 'configs/data/alpaca_sample.jsonl'}", "model.name=builtin:tiny-llama-256",
            f"training.max_steps={steps}", "training.logging_steps=1", "training.eval_strategy=no",
            "training.save_strategy=no", "training.overwrite_output_dir=true", "data.validation_split=0",
            "export.merged=false", "export.gguf=[]", "export.ollama=false", "tracking.backends=[none]"]
    if not ctx.smoke:   # as tests/test_gpu.py: 4-bit with bf16 compute, as configs/mistral.yaml has it
        over += ["training.bf16=true", "training.fp16=false", "quantization.bnb_4bit_compute_dtype=bfloat16"]
    return load_config(REPO / "configs/tiny.yaml", over + ["export.report=false"])


def _logits(model, batch):
    import torch
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _compare(a, b) -> dict:
    diff = (a - b).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": float(b.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def part_correctness(ctx) -> tuple[str, str]:
    import torch
    from peft import PeftModel
    from transformers import TrainerCallback

    from ftlib import model as model_mod
    from ftlib.recipe import run_recipe
    from ftlib.storage import RunDir

    r, checks = ctx.result, {}
    r["checks"] = checks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = 30 if not ctx.smoke else 20
    cfg = _tiny_config(ctx, steps)
    r.update(device=device, compute_dtype=str(dtype).replace("torch.", ""), model=cfg.model.name, steps=steps)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    result = run_recipe(cfg, callbacks=[Losses()], log=lambda m: print(f"[ftlib] {m}", flush=True))
    r["train_seconds"] = time.perf_counter() - t0
    r["losses"] = losses
    head, tail = losses[:3], losses[-3:]
    r["loss_first"], r["loss_last"] = (sum(head) / len(head), sum(tail) / len(tail)) if losses else (None, None)
    checks["trained_all_steps"] = result.global_step == steps
    checks["loss_falls"] = bool(losses) and r["loss_last"] < r["loss_first"]
    import bitsandbytes as bnb
    layers = [m for m in result.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    r["linear4bit_layers"] = len(layers)
    checks["4bit_layers_on_device"] = bool(layers) and all(m.weight.device.type == device for m in layers)
    checks["compute_dtype"] = bool(layers) and all(m.compute_dtype == dtype for m in layers)
    ctx.save()

    # The saved adapter, reloaded onto a freshly quantized base, gives the trained model's logits.
    run = RunDir(result.run_dir)
    adapter = run.adapter
    model_path = model_mod.resolve_model_path(cfg)
    tokenizer = model_mod.load_tokenizer(cfg, model_path)
    texts = ["Reverse the word. apple", "Add the two numbers. 3 and 4", "What is the opposite of warm?"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    trained = _logits(result.model, batch)
    del result
    base4 = model_mod.load_base_model(cfg, model_path, quantized=True)
    reloaded = _logits(PeftModel.from_pretrained(base4, str(adapter)), batch)
    r["adapter_reload"] = _compare(reloaded, trained)
    reload_tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    r["adapter_reload"]["tolerance"] = reload_tol * max(1.0, r["adapter_reload"]["max_abs_logit"])
    checks["adapter_reload_reproduces_logits"] = r["adapter_reload"]["max_abs_diff"] <= r["adapter_reload"]["tolerance"]
    del base4
    ctx.save()

    # Merge (ftlib.model.merge_adapter: full-precision base, never the 4-bit one) vs the same base
    # with the adapter unmerged, both in the compute dtype.
    merged = model_mod.merge_adapter(cfg, model_path, adapter, dtype=dtype).to(device)
    merged_logits = _logits(merged, batch)
    del merged
    base = model_mod.load_base_model(cfg, model_path, quantized=False, dtype=dtype).to(device)
    unmerged = _logits(PeftModel.from_pretrained(base, str(adapter)), batch)
    r["merge"] = _compare(merged_logits, unmerged)
    # bf16 keeps 8 significant bits: W + BA rounded once vs Wx + B(Ax) rounded apart.
    merge_tol = 0.03 if dtype == torch.bfloat16 else 1e-4
    r["merge"]["tolerance"] = merge_tol * max(1.0, r["merge"]["max_abs_logit"])
    checks["merge_matches"] = r["merge"]["max_abs_diff"] <= r["merge"]["tolerance"]
    del base
    if device == "cuda":
        torch.cuda.empty_cache()
    ctx.save()

    r["gpu_tests"] = run_gpu_tests(ctx)
    g = r["gpu_tests"]
    checks["gpu_tests_pass"] = g.get("status") == "ran" and g["failed"] == 0 and g["errors"] == 0
    if not ctx.smoke:
        checks["gpu_tests_ran_some"] = g.get("passed", 0) > 0
    bad = [k for k, v in checks.items() if not v]
    return ("failed", "checks failed: " + ", ".join(bad)) if bad else ("ok", f"{len(checks)} checks hold")


def run_gpu_tests(ctx) -> dict:
    """tests/**/test_gpu.py in pytest (a subprocess with what is left of the deadline)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_gpu.py"))
    if not files:
        return {"status": "not found", "files": [], "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    junit = ctx.work / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    timeout = max(5.0, ctx.remaining() - 5)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={junit}",
           *files]
    t0 = time.perf_counter()
    out = {"files": files, "command": " ".join(cmd[1:]), "timeout_s": round(timeout, 1)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out.update(status="ran", returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-1500:])
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-1500:]
        out.update(status="cut", tail=tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
    out["seconds"] = time.perf_counter() - t0
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        root = ET.parse(junit).getroot()
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    out.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
               failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"])
    if out["status"] == "ran" and out["returncode"] not in (0, 5) and not (out["failed"] or out["errors"]):
        out["errors"] = 1          # pytest failed before any test (collection, usage)
    return out


# ============================================================================ benchmark (GPU arm)
def part_benchmark(ctx) -> tuple[str, str]:
    r = ctx.result
    bench_json, bench_md = ctx.work / "bench.json", ctx.work / "bench.md"
    bench_json.unlink(missing_ok=True)
    left = ctx.remaining() - 5
    # bench_training builds the random model into the work folder (<work>/random-mistral-7b), where
    # the preflight and speed parts find it (gpu_speed.ensure_model); its own files do not collide.
    cmd = [sys.executable, str(HERE / "bench_training.py"), "--work-dir", str(ctx.work), "--json", str(bench_json),
           "--out", str(bench_md), "--arm-timeout", str(round(max(0.6 * left, 10), 1))]
    cmd += ["--gpu-smoke", "--peak-tflops", "1"] if ctx.smoke else ["--gpu", "--short"]
    r["command"] = " ".join(cmd[1:])
    ctx.save()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(left, 5))
    r["returncode"] = proc.returncode
    if not bench_json.exists():
        r["tail"] = (proc.stdout + proc.stderr)[-3000:]
        return "failed", f"bench_training exited {proc.returncode} without results"
    data = json.loads(bench_json.read_text())
    plan, cmp = data["plan"], data["comparison"]
    r["model_shape"] = plan["model_shape"]
    r["max_length"], r["sizes"] = plan["max_length"], plan["sizes"]
    r["quantization"], r["lora"] = plan["quantization"], {k: plan["lora"].get(k) for k in ("r", "lora_alpha",
                                                                                           "target_modules")}
    from arms import checkpointing_on
    r["gradient_checkpointing"] = checkpointing_on(plan["training"])
    keys = ("useful_tokens_per_s", "total_tokens_per_s", "median_step_seconds", "train_seconds",
            "peak_memory_bytes", "peak_memory_absolute_bytes", "padding_fraction", "mfu", "model_flops",
            "useful_tokens", "total_tokens", "steps", "examples", "heldout_loss_before", "heldout_loss_after")
    for arm in ("baseline", "ftlib"):
        r[arm] = {k: cmp[arm].get(k) for k in keys}
        r[arm]["peak_memory_kind"] = cmp[arm].get("peak_memory_kind")
    r["ratios"] = {k: cmp["ratios"].get(k) for k in ("useful_tokens_per_s", "total_tokens_per_s",
                                                    "peak_memory", "mfu", "train_seconds")}
    r["ratios"]["median_step_seconds"] = (r["ftlib"]["median_step_seconds"] / r["baseline"]["median_step_seconds"]
                                          if r["baseline"]["median_step_seconds"] else None)
    peak = cmp["ftlib"].get("mfu") and cmp["ftlib"]["model_flops"] / cmp["ftlib"]["train_seconds"] / cmp["ftlib"]["mfu"]
    r["peak_flops"] = peak
    r["peak_flops_source"] = ("nominal 1 TFLOP/s on CPU (--smoke): MFU numbers are placeholders" if ctx.smoke else
                              "dense bf16 tensor-core peak of the GPU (H100/H200: 989 TFLOP/s, no sparsity)")
    r["mfu_formula"] = ("4 N_base + 6 N_lora FLOPs per real token (LoRA: forward 2N, backward through the "
                        "activations 2N, no weight gradient for the frozen base; recompute not counted) "
                        "+ causal attention 6 layers hidden l^2 per example of length l")
    r["fairness_checks"] = cmp["checks"]
    r["target"] = cmp["target"]
    ctx.save()
    bad = [k for k, v in cmp["checks"].items() if not v]
    numbers = [r[a][k] for a in ("baseline", "ftlib") for k in ("useful_tokens_per_s", "total_tokens_per_s",
                                                               "median_step_seconds", "mfu")]
    if bad:
        return "failed", "fairness checks failed: " + ", ".join(bad)
    if not all(_finite(x) for x in numbers):
        return "failed", "a measurement is missing or not finite"
    return "ok", f"ftlib/baseline useful tokens/s {r['ratios']['useful_tokens_per_s']:.2f}x"
