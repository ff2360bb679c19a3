"""gpu_check's last two parts on the 7B-shaped model: preflight's estimate vs the measured peak,
and the speed options for packed rows. Also the shared pieces: the random model (built once in
the work folder, reused by the benchmark part), ftlib's 4-bit + LoRA model, packed batches.

preflight      For micro-batch 1 and 4, with and without gradient checkpointing, at seq 2048:
               ftlib.preflight's estimate_memory vs torch.cuda.max_memory_allocated over two
               optimizer steps of ftlib's own model (build_training_model: NF4 + double quant,
               prepare_model_for_kbit_training, LoRA r16 all-linear, dropout 0.05) on packed rows,
               under bf16 autocast as the Trainer runs it, with torch AdamW (its states sit in
               torch's allocator; a paged optimizer's would not). The estimate's total includes
               1 GiB of CUDA context/workspace that max_memory_allocated never sees, so the
               comparison is (total - cuda_overhead) vs measured; target: within 15%.
speed_options  The same model on packed rows (2 x 2048, position_ids restarting, as ftlib's
               collator gives them): attention sdpa (ftlib's default) vs eager vs flex_attention,
               Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) when
               liger_kernel imports, then torch.compile of the LoRA layers (inductor; aot_eager in
               --smoke; on top of Liger when Liger ran: its patches cannot be undone, "with"
               says so). Each from the same initial adapter and batch, so first-step losses must
               agree; the fastest that agrees is named. ftlib's defaults are not changed here.
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_NAMES = {"gpu": "random-mistral-7b", "smoke": "random-mistral-stand-in"}
SEQ = {"gpu": 2048, "smoke": 256}
TARGET_ERROR = 0.15
# Liger's kernels cannot be taken out again: it runs after the attention options, and
# compile_lora (the one most likely to run out of time) last, on top of Liger when Liger ran.
OPTIONS = ("sdpa", "eager", "flex_attention", "liger", "compile_lora")


# ============================================================================ shared pieces
def build_model_here(path: Path, mode: str) -> None:
    from bench_training import RANDOM_MODELS, build_random_mistral
    from ftlib.tiny import build_tokenizer
    shape, device, dtype = RANDOM_MODELS[MODEL_NAMES[mode]]
    build_random_mistral(path, build_tokenizer(), shape, device, dtype)


def ensure_model(ctx) -> Path:
    """The random Mistral of this mode in the work folder, built (in a child process, so no CUDA
    memory stays behind) when absent."""
    path = ctx.work / MODEL_NAMES[ctx.mode]
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, str(HERE / "gpu_check.py"), "--build-model", str(path), "--work-dir", str(ctx.work)]
        subprocess.run(cmd + (["--smoke"] if ctx.smoke else []), cwd=REPO, check=True,
                       timeout=max(ctx.remaining() - 5, 5))
        ctx.result["model_build_seconds"] = time.perf_counter() - t0
    return path


def mistral_config(ctx, path: Path, seq: int):
    from bench_training import MODES
    from ftlib.config import load_config
    over = [f"model.name={path}", f"storage.root={ctx.work / 'speed-runs'}", f"storage.hf_cache={ctx.work / 'hf-cache'}",
            f"data.train={REPO / 'configs/data/alpaca_sample.jsonl'}", f"data.max_length={seq}",
            "tracking.backends=[none]"]
    return load_config(REPO / "configs/mistral.yaml", over + (MODES["gpu-smoke"]["overrides"] if ctx.smoke else []))


def qlora_model(cfg, path: Path):
    """ftlib's training model: 4-bit base, prepare_model_for_kbit_training, LoRA."""
    from ftlib.model import build_training_model
    return build_training_model(cfg, str(path), log=lambda m: print(f"[ftlib] {m}", flush=True))


def packed_batch(cfg, path: Path, rows: int, seq: int, device: str) -> dict:
    """`rows` rows of exactly `seq` tokens: bench_data examples tokenized by ftlib, back to back,
    position_ids restarting at each (the last one cut), the first label of each ignored."""
    import torch

    from bench_data import make_rows
    from ftlib.data import IGNORE_INDEX, to_sample, tokenize_sample
    from ftlib.model import load_tokenizer

    tokenizer = load_tokenizer(cfg, str(path))
    samples = [tokenize_sample(tokenizer, to_sample(row, cfg.data), cfg.data) for row in make_rows(64, seed=3)]
    out = {"input_ids": [], "position_ids": [], "labels": []}
    k = 0
    for _ in range(rows):
        ids, pos, labels = [], [], []
        while len(ids) < seq:
            s = samples[k % len(samples)]
            k += 1
            take = min(len(s["input_ids"]), seq - len(ids))
            ids += s["input_ids"][:take]
            pos += list(range(take))
            labels += [IGNORE_INDEX] + s["labels"][1:take]
        for key, value in (("input_ids", ids), ("position_ids", pos), ("labels", labels)):
            out[key].append(value)
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in out.items()}


def train_steps(model, optimizer, batch, steps: int, autocast_dtype) -> tuple[list[float], list[float]]:
    """Forward (under autocast like the Trainer with bf16), backward, optimizer step: seconds, losses."""
    import torch
    cuda = batch["input_ids"].is_cuda
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def _setup(ctx, rows: int):
    """(cfg, model, batch, device, autocast dtype, seq) on this machine."""
    import torch
    path = ensure_model(ctx)
    seq = SEQ[ctx.mode]
    cfg = mistral_config(ctx, path, seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = qlora_model(cfg, path)
    model.train()          # as the Trainer does: checkpointing and dropout act in training mode only
    ctx.result["model_load_seconds"] = time.perf_counter() - t0
    autocast = torch.bfloat16 if cfg.training.get("bf16") else None
    return cfg, model, packed_batch(cfg, path, rows, seq, device), device, autocast, seq


def set_checkpointing(model, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, non-reentrant, as ftlib's Trainer sets it:
    ftlib.model.build_training_model leaves it to the Trainer, and these parts train without one."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _free(device: str) -> None:
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ============================================================================ preflight vs measured
def _estimate_memory():
    try:
        from ftlib.preflight.memory import estimate_memory
    except ImportError:          # the package's public name, once ftlib/preflight/__init__ exports it
        from ftlib.preflight import estimate_memory
    return estimate_memory


def part_preflight(ctx) -> tuple[str, str]:
    import torch

    from fairness import proc_status, reset_peak_rss

    r = ctx.result
    rss_before_model = proc_status("VmRSS")
    cfg, model, batch1, device, autocast, seq = _setup(ctx, 4)
    estimate_memory = _estimate_memory()
    shape = json.loads((Path(cfg.model.name) / "config.json").read_text())
    compute = "bfloat16" if autocast is not None else "float32"
    r.update(seq_len=seq, device=device, optim="adamw_torch", target_error=TARGET_ERROR,
             measured_as=("torch.cuda.max_memory_allocated over 2 optimizer steps" if device == "cuda" else
                          "CPU (--smoke): peak RSS during 2 steps minus RSS before the model was loaded; "
                          "the target does not apply"),
             estimate_as="estimate_memory(...).total - cuda_overhead", configs=[])
    total_gpu = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    for micro_batch, checkpointing in ((1, True), (4, True), (1, False), (4, False)):
        entry = {"micro_batch": micro_batch, "gradient_checkpointing": checkpointing}
        r["configs"].append(entry)
        est = estimate_memory(shape, method="qlora", lora_r=int(cfg.lora["r"]),
                              lora_target_modules=cfg.lora["target_modules"], compute_dtype=compute,
                              double_quant=bool(cfg.quantization.get("bnb_4bit_use_double_quant")),
                              micro_batch=micro_batch, seq_len=seq, gradient_checkpointing=checkpointing,
                              optim="adamw_torch", lora_dropout=float(cfg.lora.get("lora_dropout", 0.0)),
                              upcast_non_quantized=True, attn_implementation=cfg.model.attn_implementation or "sdpa",
                              dropout_mask_bytes=1 if device == "cuda" else 4)
        entry["estimate_total_bytes"] = est.total
        entry["estimate_bytes"] = est.total - est.cuda_overhead
        entry["estimate_breakdown"] = est.breakdown()
        if total_gpu and entry["estimate_bytes"] > 0.9 * total_gpu:
            entry.update(status="skipped", reason="the estimate exceeds 90% of the GPU's memory")
            ctx.save()
            continue
        if ctx.remaining() < 15:
            entry.update(status="skipped", reason=f"{ctx.remaining():.0f} s left of the part's deadline")
            ctx.save()
            continue
        set_checkpointing(model, checkpointing)
        batch = {k: v[:micro_batch] for k, v in batch1.items()}
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        _free(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            entry["allocated_before_bytes"] = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
        try:
            times, losses = train_steps(model, optimizer, batch, 2, autocast)
        except torch.cuda.OutOfMemoryError as exc:
            entry.update(status="oom", reason=str(exc)[:300])
            optimizer = None
            for p in params:
                p.grad = None
            _free(device)
            ctx.save()
            continue
        if device == "cuda":
            entry["measured_bytes"] = torch.cuda.max_memory_allocated()
            entry["reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:
            entry["measured_bytes"] = proc_status("VmHWM") - rss_before_model
        entry["error"] = (entry["estimate_bytes"] - entry["measured_bytes"]) / entry["measured_bytes"]
        entry["within_target"] = abs(entry["error"]) <= TARGET_ERROR
        entry.update(status="ok", step_seconds=times, losses=losses)
        optimizer = None
        for p in params:
            p.grad = None
        _free(device)
        ctx.save()
    measured = [c for c in r["configs"] if c.get("status") == "ok"]
    r["all_within_target"] = bool(measured) and all(c["within_target"] for c in measured)
    if len(measured) < 3:
        return "failed", f"only {len(measured)} of 4 configurations measured"
    if ctx.smoke:
        return "ok", f"{len(measured)} configurations measured (CPU: errors recorded, target not applied)"
    worst = max(abs(c["error"]) for c in measured)
    return ("ok" if r["all_within_target"] else "failed"), f"worst error {worst:.1%} (target {TARGET_ERROR:.0%})"


# ============================================================================ speed options
def _set_attention(model, name: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:
        base.config._attn_implementation = name


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _apply(option: str, model, smoke: bool):
    """Put `option` in place; returns (undo function or None when it cannot be undone, details)."""
    import torch
    if option in ("sdpa", "eager", "flex_attention"):
        _set_attention(model, option)
        return (lambda: _set_attention(model, "sdpa")), {}
    if option == "compile_lora":
        backend = "aot_eager" if smoke else "inductor"
        layers = _lora_layers(model)
        for m in layers:
            m.compile(backend=backend)

        def undo():
            for m in layers:
                m._compiled_call_impl = None
            torch._dynamo.reset()
        return undo, {"backend": backend, "layers": len(layers)}
    if option == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_mistral
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        apply_liger_kernel_to_mistral(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=True, model=base)
        return None, {"kernels": "rope, rms_norm, swiglu, fused_linear_cross_entropy"}
    raise ValueError(option)


def part_speed_options(ctx) -> tuple[str, str]:
    import importlib.util

    import torch

    from arms import checkpointing_on

    r = ctx.result
    rows = 2
    t0 = time.perf_counter()
    cfg, model, batch, device, autocast, seq = _setup(ctx, rows)
    checkpointing = checkpointing_on(cfg.training)
    set_checkpointing(model, checkpointing)
    r["setup_seconds"] = time.perf_counter() - t0
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in params.items()}
    warmup, timed = (1, 2) if ctx.smoke else (2, 4)
    r.update(rows=rows, seq_len=seq, device=device, positions_per_step=rows * seq, warmup_steps=warmup,
             timed_steps=timed, gradient_checkpointing=checkpointing,
             options={}, note="measured only; ftlib's defaults are not changed by this check")
    # Seconds an option needs at least (compiling ones more), so none starts that cannot finish.
    need = {"compile_lora": 60, "flex_attention": 40, "liger": 30} if not ctx.smoke else {}
    for option in OPTIONS:
        entry: dict = {}
        r["options"][option] = entry
        if option == "liger" and importlib.util.find_spec("liger_kernel") is None:
            entry.update(status="skipped", reason="liger_kernel is not installed (the kit's liger-kernel wheel "
                                                   "was not installed, or this is the CPU smoke run)")
            ctx.save()
            continue
        if ctx.remaining() < need.get(option, 15 if not ctx.smoke else 3):
            entry.update(status="skipped", reason=f"not started: {ctx.remaining():.0f} s left of the part's deadline")
            ctx.save()
            continue
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(initial[n])
        optimizer = torch.optim.AdamW(list(params.values()), lr=2e-4)
        undo = None
        started = time.perf_counter()
        try:
            undo, details = _apply(option, model, ctx.smoke)
            entry.update(details)
            _free(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first, first_losses = train_steps(model, optimizer, batch, warmup, autocast)
            times, _ = train_steps(model, optimizer, batch, timed, autocast)
        except Exception as exc:  # noqa: BLE001 - an option that fails is a result
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:600],
                         seconds=time.perf_counter() - started)
            ctx.save()
            if undo is not None:
                undo()
            for p in params.values():
                p.grad = None
            continue
        step = statistics.median(times)
        if option == "compile_lora" and r["options"].get("liger", {}).get("status") == "ok":
            entry["with"] = ["liger"]
        entry.update(status="ok", first_step_seconds=first[0], step_seconds=times, median_step_seconds=step,
                     tokens_per_s=rows * seq / step, first_loss=first_losses[0],
                     seconds=time.perf_counter() - started,
                     peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
        if undo is not None:
            undo()
        ctx.save()
    ok = {k: v for k, v in r["options"].items() if v.get("status") == "ok"}
    if "sdpa" not in ok:
        return "failed", "the sdpa reference was not measured"
    ref = ok["sdpa"]
    tolerance = 0.01 * max(1.0, abs(ref["first_loss"]))
    for name, v in ok.items():
        v["speedup_vs_sdpa"] = v["tokens_per_s"] / ref["tokens_per_s"]
        v["loss_delta_vs_sdpa"] = v["first_loss"] - ref["first_loss"]
        v["loss_agrees"] = abs(v["loss_delta_vs_sdpa"]) <= tolerance
    agreeing = {k: v for k, v in ok.items() if v["loss_agrees"]}
    r["loss_tolerance"] = tolerance
    r["winner"] = max(agreeing, key=lambda k: agreeing[k]["tokens_per_s"])
    attention = {k: v for k, v in agreeing.items() if k in ("sdpa", "eager", "flex_attention")}
    r["attention_winner"] = max(attention, key=lambda k: attention[k]["tokens_per_s"])
    disagree = sorted(set(ok) - set(agreeing))
    failed = sorted(k for k, v in r["options"].items() if v.get("status") == "failed")
    note = f"fastest: {r['winner']} ({agreeing[r['winner']]['speedup_vs_sdpa']:.2f}x sdpa)"
    if disagree:
        note += f"; loss disagrees: {', '.join(disagree)}"
    if failed:
        note += f"; failed: {', '.join(failed)}"
    return "ok", note
