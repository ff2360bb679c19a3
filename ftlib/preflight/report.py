"""The readable preflight report (format_report): memory breakdown, fit verdict, method table,
step time and data statistics, as text."""
from __future__ import annotations

from typing import Any, Mapping

from .gpus import StepTimeEstimate, check_fits, gpu_label
from .memory import MemoryEstimate
from .shape import GiB, PreflightError

# How the report names each MemoryEstimate.COMPONENTS row.
_LABELS = {
    "base_weights": "base weights", "trainable_params": "trainable (LoRA) params",
    "gradients": "gradients", "optimizer_states": "optimizer states",
    "master_weights": "fp32 master weights", "weight_copies": "autocast weight copies",
    "activations": "activations", "logits": "logits + loss (fp32)",
    "layer_backward": "one-layer backward", "dequant_workspace": "dequant/gather workspace",
    "cuda_overhead": "CUDA context + workspace",
}


def format_report(estimate: MemoryEstimate, gpu: str | float | None = None, *,
                  headroom: float = 0.9, advice: list[tuple[str, float, bool]] | None = None,
                  data_stats: Mapping[str, Any] | None = None,
                  step_time: StepTimeEstimate | None = None) -> str:
    """A readable multi-line preflight report."""
    e = estimate
    lines = [
        "Preflight",
        f"  method {e.method}, compute {e.compute_dtype}, optim {e.optim}, micro-batch "
        f"{e.micro_batch} x seq {e.seq_len} ({e.tokens_per_step:,} tokens/step), checkpointing "
        f"{'on' if e.gradient_checkpointing else 'off'}, world size {e.world_size}"
        + (f", ZeRO-{e.zero_stage}" if e.zero_stage else ""),
        f"  parameters {e.n_params / 1e9:.2f} B, trainable {e.n_trainable:,} "
        f"({100 * e.n_trainable / e.n_params:.2f}%)",
        "  memory per GPU (GiB):",
    ]
    peak_loss = e.logits >= e.layer_backward
    for key, value in e.breakdown().items():
        if value == 0:
            continue
        mark = ""
        if key in ("logits", "layer_backward"):
            mark = "  (peak term)" if (key == "logits") == peak_loss else "  (not at the peak)"
        lines.append(f"    {_LABELS[key]:<28}{value / GiB:8.2f}{mark}")
    lines.append(f"    {'total (estimated peak)':<28}{e.total_gib:8.2f}")
    other = e.activations_no_checkpointing if e.gradient_checkpointing else e.activations_checkpointing
    lines.append(f"    (activations {'without' if e.gradient_checkpointing else 'with'} "
                 f"checkpointing would be {other / GiB:.2f})")
    if gpu is not None:
        try:
            v = check_fits(e, gpu, headroom)
            lines.append(f"  fits {v.gpu}: {v.peak_gib:.1f} of {v.usable_gib:.1f} GiB usable "
                         f"({headroom:.0%} of {v.gpu_gib:.1f}), {v.margin_gib:.1f} GiB spare")
            lines += [f"  note: {n}" for n in v.notes]
        except PreflightError as err:
            lines.append(f"  DOES NOT FIT {gpu_label(gpu)}: {str(err).removeprefix('does not fit: ')}")
    lines += [f"  note: {n}" for n in e.notes]
    if advice:
        lines.append("  methods on this GPU:")
        for method, gib, fits in advice:
            lines.append(f"    {method:<6}{gib:8.1f} GiB  {'fits' if fits else 'does not fit'}")
    if step_time is not None:
        st = step_time
        lines.append(f"  time: ~{st.seconds_per_step:.2f} s/step, ~{st.tokens_per_s:,.0f} tokens/s "
                     f"({st.flops_per_token / 1e9:.1f} GFLOP/token at {st.assumed_mfu:.0%} of "
                     f"{st.gpu}'s {st.peak_tflops:g} TFLOP/s; an assumption, not a measurement)")
    if data_stats:
        d = data_stats
        lines += [
            f"  data: {d['n_samples']:,} samples, tokens p50 {d['p50']} p90 {d['p90']} "
            f"p99 {d['p99']} max {d['max']}",
            f"    truncated: {d['n_truncated']} samples ({100 * d['truncated_fraction']:.1f}%), "
            f"{d['tokens_lost_to_truncation']:,} tokens lost",
            f"    padding: to max_length {100 * d['padding_to_max_length']:.1f}%, dynamic "
            f"{100 * d['padding_dynamic_unsorted']:.1f}%, length-sorted "
            f"{100 * d['padding_dynamic_sorted']:.1f}%, packed {100 * d['padding_packed']:.1f}% "
            f"({d['packed_rows']} rows)",
        ]
    return "\n".join(lines)
