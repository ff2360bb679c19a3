"""The benchmark's report: per-arm figures, the comparison and its checks, and the Markdown.

- aggregate: one arm over its repeats (median times; counts must agree);
- derive / compare: tokens/s, padding, memory, held-out loss, MFU (GPU), ratios ftlib/baseline,
  the fairness checks (exit 1 in bench_training when one fails) and the target (>= 2x useful
  tokens/s, held-out loss no worse);
- machine_info / versions: what the numbers were measured on;
- render_report: the Markdown section that benchmarks/RESULTS.md collects.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from arms import ARMS, checkpointing_on

REPO = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s; the first name that appears in the GPU's name wins.
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                 ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
                 ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]

RESULTS_TITLE = "# Benchmark results: ftlib vs the QLoRA guide recipe\n\n"
LOSS_TOLERANCE = 0.01   # nats per response token: "no worse" allows this much run-to-run noise


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
        "total_tokens_per_cpu_s": r["positions"] / r["train_cpu_seconds"],
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
        "total_tokens_per_cpu_s": f["total_tokens_per_cpu_s"] / b["total_tokens_per_cpu_s"],
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
        f"## ftlib training vs the QLoRA guide recipe: {plan['model']}, draw {plan.get('draw', 'long-tailed')}"
        + (" (GPU)" if gpu else " (CPU)"),
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
        f"gradient checkpointing {checkpointing_on(plan['training'])}, "
        f"seed {plan['seed']}), identical in both arms; max_length {plan['max_length']}.",
        f"- Data: `benchmarks/bench_data.py` draw `{plan.get('draw', 'long-tailed')}` (seeded, alpaca-like; pool shuffle seed "
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
        row("total tokens per CPU-second (cost per position fed)", f"{b['total_tokens_per_cpu_s']:,.0f}",
            f"{f['total_tokens_per_cpu_s']:,.0f}", f"{ratio['total_tokens_per_cpu_s']:.2f}x"),
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
