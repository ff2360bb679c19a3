"""gpu_check's Markdown (gpu-check.md) and the short summary both files carry, from the JSON alone."""
from __future__ import annotations

import math


def _num(x, fmt: str = ",.0f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _part(report: dict, name: str) -> dict:
    return next((p for p in report["parts"] if p["name"] == name), {"status": "missing", "result": {}})


def summarize(report: dict) -> dict:
    """The headline numbers: statuses, the benchmark's ratios, preflight errors, the speed winner."""
    out = {"statuses": {p["name"]: p["status"] for p in report["parts"]}}
    bench = _part(report, "benchmark")["result"]
    if bench.get("ratios"):
        out["benchmark"] = {"useful_tokens_per_s_ratio": bench["ratios"].get("useful_tokens_per_s"),
                            "total_tokens_per_s_ratio": bench["ratios"].get("total_tokens_per_s"),
                            "mfu_ftlib": bench.get("ftlib", {}).get("mfu"),
                            "mfu_baseline": bench.get("baseline", {}).get("mfu")}
    pre = _part(report, "preflight")["result"]
    if pre.get("configs"):
        out["preflight_errors"] = {f"mb{c['micro_batch']}-{'ckpt' if c['gradient_checkpointing'] else 'nockpt'}":
                                   c.get("error") for c in pre["configs"]}
    speed = _part(report, "speed_options")["result"]
    if speed.get("winner"):
        out["speed_winner"] = speed["winner"]
    return out


def render_markdown(report: dict) -> str:
    env = _part(report, "environment")["result"]
    gpu = env.get("gpu") or {}
    lines = [f"# ftlib GPU check ({report['mode']})", "",
             f"Started {report['started']}, {report['seconds']:.0f} s of at most {report['total_deadline_s']:.0f} s "
             f"(deadline scale {report['deadline_scale']}). Command: `{report['command']}`", ""]
    if report["mode"] == "smoke":
        lines += ["Smoke mode: CPU, fp32 compute, tiny Mistral-shaped stand-in; speeds, memory and MFU are "
                  f"placeholders. Hidden from every part: {', '.join(report['hidden_modules']) or '-'}.", ""]
    lines += ["| part | status | seconds | deadline | note |", "| --- | --- | ---: | ---: | --- |"]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | **{p['status']}** | {p['seconds']:.1f} | {p['deadline_s']:.1f} | "
                     f"{str(p.get('note', '')).replace('|', '/')} |")
    lines += ["", "## environment", ""]
    if env:
        lines.append(f"- GPU: {gpu.get('name', 'none')}, {gpu.get('memory_gib', '-')} GiB, driver "
                     f"{gpu.get('driver', '-')}, capability {gpu.get('capability', '-')}; torch CUDA "
                     f"{env.get('torch_cuda')}; Python {env.get('python')}")
        lines.append("- " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in env.get("versions", {}).items()))
        if env.get("import_errors"):
            lines.append("- import errors: " + "; ".join(f"{k}: {v}" for k, v in env["import_errors"].items()))
    lines += ["", "## correctness", ""]
    c = _part(report, "correctness")["result"]
    if c:
        lines.append(f"- {c.get('model')} on {c.get('device')}, compute {c.get('compute_dtype')}, {c.get('steps')} "
                     f"steps: loss {_num(c.get('loss_first'), '.3f')} -> {_num(c.get('loss_last'), '.3f')}")
        for key, label in (("adapter_reload", "adapter reloaded vs trained"), ("merge", "merged vs unmerged")):
            if key in c:
                d = c[key]
                lines.append(f"- {label}: max |diff| {d['max_abs_diff']:.2e} (tolerance {d['tolerance']:.2e}), "
                             f"argmax agreement {d['argmax_agreement']:.1%}")
        g = c.get("gpu_tests")
        if g:
            lines.append(f"- gpu tests ({', '.join(g.get('files', []))}): {g.get('status')}: {g.get('passed', 0)} "
                         f"passed, {g.get('failed', 0)} failed, {g.get('errors', 0)} errors, "
                         f"{g.get('skipped', 0)} skipped")
        if c.get("checks"):
            lines.append("- checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c["checks"].items()))
    lines += ["", "## benchmark: ftlib vs the guide recipe", ""]
    b = _part(report, "benchmark")["result"]
    if b.get("baseline"):
        s = b["model_shape"]
        lines += [f"Model: {s['layers']} layers, hidden {s['hidden_size']}, intermediate {s['intermediate_size']}, "
                  f"{s['heads']}/{s['kv_heads']} heads, vocab {s['vocab_size']}; max_length {b['max_length']}; "
                  f"{b['sizes']['examples']} examples in {b['sizes']['steps']} steps (baseline "
                  f"{b['sizes']['baseline_batch']} padded rows/step, ftlib {b['sizes']['ftlib_batch']} packed). "
                  f"MFU over {_num((b.get('peak_flops') or 0) / 1e12, ',.0f')} TFLOP/s: {b['peak_flops_source']}; "
                  f"{b['mfu_formula']}.", "",
                  "| | baseline | ftlib | ftlib / baseline |", "| --- | ---: | ---: | ---: |"]
        bl, fl, ra = b["baseline"], b["ftlib"], b["ratios"]
        for key, label, fmt in (("useful_tokens_per_s", "useful tokens/s", ",.0f"),
                                ("total_tokens_per_s", "total tokens/s (incl. padding)", ",.0f"),
                                ("median_step_seconds", "time per step (median), s", ".3f"),
                                ("mfu", "MFU", ".2%")):
            lines.append(f"| {label} | {_num(bl.get(key), fmt)} | {_num(fl.get(key), fmt)} | "
                         f"{_num(ra.get(key), '.2f')} |")
        lines.append(f"| peak memory ({bl.get('peak_memory_kind', '')}) | {_gib(bl.get('peak_memory_absolute_bytes'))} "
                     f"| {_gib(fl.get('peak_memory_absolute_bytes'))} | {_num(ra.get('peak_memory'), '.2f')} |")
        lines.append(f"| padding fraction | {_num(bl.get('padding_fraction'), '.1%')} | "
                     f"{_num(fl.get('padding_fraction'), '.1%')} | |")
        lines += ["", "Fairness checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                    for k, v in b.get("fairness_checks", {}).items())]
    lines += ["", "## preflight estimate vs measured peak", ""]
    pre = _part(report, "preflight")["result"]
    if pre.get("configs"):
        lines += [f"Measured: {pre['measured_as']}; estimate: {pre['estimate_as']}; seq {pre['seq_len']}, "
                  f"optim {pre['optim']}; target within {pre['target_error']:.0%}.", "",
                  "| micro-batch | checkpointing | estimate | measured | error | status |",
                  "| ---: | --- | ---: | ---: | ---: | --- |"]
        for cf in pre["configs"]:
            lines.append(f"| {cf['micro_batch']} | {'on' if cf['gradient_checkpointing'] else 'off'} | "
                         f"{_gib(cf.get('estimate_bytes'))} | {_gib(cf.get('measured_bytes'))} | "
                         f"{_num(cf.get('error'), '+.1%')} | {cf.get('status', 'not reached')} "
                         f"{cf.get('reason', '')} |")
    lines += ["", "## speed options (packed rows)", ""]
    sp = _part(report, "speed_options")["result"]
    if sp.get("options"):
        lines += [f"{sp['rows']} rows x {sp['seq_len']} positions a step, gradient checkpointing "
                  f"{sp['gradient_checkpointing']}, {sp['warmup_steps']} warm-up + {sp['timed_steps']} timed steps "
                  f"each, from the same adapter and batch. {sp['note']}.", "",
                  "| option | status | tokens/s | median step, s | first step, s | vs sdpa | first loss | peak memory |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, o in sp["options"].items():
            status = o.get("status", "not reached")
            extra = o.get("reason") or o.get("error") or ""
            lines.append(f"| {name} | {status}{(': ' + extra.replace('|', '/')) if extra else ''} | "
                         f"{_num(o.get('tokens_per_s'))} | {_num(o.get('median_step_seconds'), '.3f')} | "
                         f"{_num(o.get('first_step_seconds'), '.2f')} | {_num(o.get('speedup_vs_sdpa'), '.2f')} | "
                         f"{_num(o.get('first_loss'), '.4f')} | {_gib(o.get('peak_memory_bytes'))} |")
        if sp.get("winner"):
            lines += ["", f"Fastest with agreeing loss: **{sp['winner']}**; attention: **{sp['attention_winner']}**."]
    for p in report["parts"]:
        if p["status"] in ("failed", "cut") and (p.get("error") or p.get("log_tail")):
            lines += ["", f"## {p['name']}: {p['status']}", "", "```", (p.get("error") or p["log_tail"])[-1500:], "```"]
    return "\n".join(lines) + "\n"
