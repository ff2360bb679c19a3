"""The run report: the base model against the fine-tuned one on the run's held-out data.

    write_report(cfg, run_dir)      # after training; the recipe calls it when export.report is true

writes, atomically, in the run directory:

    report_loss.png   training (and eval) loss by step, from the newest checkpoint's trainer_state.json
    report.json       held-out loss and perplexity of both models, generations, settings
    report.md         the same for people, with the plot

Held-out loss is the mean negative log-likelihood per response token (prompt tokens carry no loss,
as in training; data.train_on_inputs counts every token) over the run's eval data exactly as
training tokenized it (the prepared eval split, from the data cache), summed over tokens, not
averaged per batch; perplexity is exp(loss). Both models are evaluated at the precision they were
trained at: a QLoRA run's base in 4 bits, with the adapter attached for the fine-tuned model and
disabled for the base. Generations are greedy, for the first N held-out prompts, from both.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data import IGNORE_INDEX, Collator, data_cache_root, hold_out, prepare_data, read_rows, tokenized_rows
from .inference import (GenerationSettings, decode_text, generate_text, model_device, place_on_gpu, render_prompt,
                        stop_token_ids)
from .model import hf_cache_dir, load_base_model, load_tokenizer, resolve_model_path, torch_dtype
from .storage import (RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, checkpoint_step,
                      newest_complete_checkpoint, read_json)
from .templates import NAMED_TEMPLATES

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
REPORT_PNG = "report_loss.png"


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------- held-out data
def held_out_eval_dataset(cfg: RunConfig, tokenizer, log=_quiet):
    """The prepared eval split (from the data cache when training made it), or None."""
    seed = int(cfg.training.get("seed", 42))
    return prepare_data(cfg.data, tokenizer, seed=seed, cache_root=data_cache_root(cfg.data, cfg.storage.root), log=log,
                        hf_cache=hf_cache_dir(cfg)).eval


def held_out_samples(cfg: RunConfig, tokenizer) -> list[dict[str, Any]]:
    """The held-out samples as conversations or text, in the eval split's order.

    data.eval: that file's usable rows. validation_split: the same rows data.prepare_data holds
    out, through the same split function (data.hold_out)."""
    data = cfg.data

    def usable(spec: str) -> list[dict[str, Any]]:
        rows, _ = read_rows(spec, data, hf_cache_dir(cfg))
        return [sample for _, sample, tokens in tokenized_rows(rows, data, tokenizer)
                if any(label != IGNORE_INDEX for label in tokens["labels"])]

    if data.eval:
        return usable(data.eval)
    if data.validation_split <= 0:
        return []
    train = usable(data.train)
    if data.max_samples:
        train = train[: data.max_samples]
    return hold_out(train, data.validation_split, int(cfg.training.get("seed", 42)))[1]


def split_prompt(tokenizer, sample: dict[str, Any]) -> dict[str, Any]:
    """Prompt (what the model is given) and reference (what the data says it should answer)."""
    if "messages" in sample:
        messages = sample["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        users = [m["content"] for m in context if m["role"] == "user"]
        return {"prompt": users[-1] if users else "", "messages": context,
                "reference": messages[last]["content"]}
    ids = tokenizer(sample["text"], add_special_tokens=False)["input_ids"]
    cut = max(1, len(ids) // 2)
    prompt = decode_text(tokenizer, ids[:cut])
    return {"prompt": prompt, "reference": decode_text(tokenizer, ids[cut:])}


# ---------------------------------------------------------------------------- loss
def held_out_loss(model, dataset, pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """(mean NLL per loss-carrying token, number of such tokens) over a prepared dataset."""
    import torch
    import torch.nn.functional as F

    collate = Collator(pad_token_id)
    device = model_device(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            logits = model(**inputs, use_cache=False).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll.double())
            count += int((shift_labels != IGNORE_INDEX).sum())
    if count == 0:
        return float("nan"), 0
    return total / count, count


def _metrics(loss: float, tokens: int) -> dict[str, Any]:
    if tokens == 0 or math.isnan(loss):
        return {"loss": None, "perplexity": None, "tokens": tokens}
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


# ---------------------------------------------------------------------------- loss curve
def newest_trainer_state(run: RunDir) -> tuple[Path | None, dict | None]:
    newest = newest_complete_checkpoint(run)
    candidates = [newest] if newest is not None else sorted(
        (p for p in run.checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=checkpoint_step, reverse=True)[:1]
    for path in candidates:
        state = read_json(path / "trainer_state.json")
        if state is not None:
            return path, state
    return None, None


def loss_history(state: dict | None) -> dict[str, list[list[float]]]:
    """{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]} from log_history."""
    train, evals = [], []
    for entry in (state or {}).get("log_history", []):
        if "loss" in entry and "step" in entry:
            train.append([entry["step"], float(entry["loss"])])
        if "eval_loss" in entry and "step" in entry:
            evals.append([entry["step"], float(entry["eval_loss"])])
    return {"train": train, "eval": evals}


def loss_plot_png(history: dict[str, list[list[float]]], title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if history["train"]:
            steps, losses = zip(*history["train"])
            ax.plot(steps, losses, marker="o", markersize=3, label="train loss")
        if history["eval"]:
            steps, losses = zip(*history["eval"])
            ax.plot(steps, losses, marker="s", markersize=4, label="eval loss")
        if not history["train"] and not history["eval"]:
            ax.text(0.5, 0.5, "no logged loss", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if history["train"] or history["eval"]:
            ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- markdown
def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    base, tuned = report["base"], report["fine_tuned"]
    lines = [f"# Run report: {report['run']}", "",
             f"- base model: `{report['model']}` ({report['method']})",
             f"- fine-tuned: `{report['fine_tuned_source']}`",
             f"- evaluated with: {report['precision']}",
             f"- held-out data: {report['eval']['source']}, {report['eval']['samples']} samples",
             f"- generations: {report['generation']['settings']}", "",
             "## Held-out loss (response tokens only)", "",
             "| model | loss | perplexity | tokens |", "|---|---:|---:|---:|",
             f"| base | {_number(base['loss'])} | {_number(base['perplexity'], 2)} | {base['tokens']} |",
             f"| fine-tuned | {_number(tuned['loss'])} | {_number(tuned['perplexity'], 2)} | {tuned['tokens']} |",
             ""]
    if base["loss"] is not None and tuned["loss"] is not None:
        lines += [f"Fine-tuning changed the held-out loss by {tuned['loss'] - base['loss']:+.4f} "
                  f"(perplexity x{tuned['perplexity'] / base['perplexity']:.3f}).", ""]
    if report.get("loss_curve"):
        lines += ["## Training loss", "", f"![loss curve]({report['loss_curve']})", "",
                  f"From `{report['loss_curve_source']}`.", ""]
    lines += ["## Generations on held-out prompts", ""]
    if not report["samples"]:
        lines += ["No held-out data (set data.eval or data.validation_split).", ""]
    for i, sample in enumerate(report["samples"], start=1):
        lines += [f"### {i}", "", "**Prompt**", "", _fence(sample["prompt"]), "",
                  "**Reference**", "", _fence(sample["reference"]), "",
                  "**Base**", "", _fence(sample["base"]), "",
                  "**Fine-tuned**", "", _fence(sample["fine_tuned"]), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- the report
def _free_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_models(cfg: RunConfig, run: RunDir, base_path: str, quantized: bool):
    """(fine-tuned model, context manager that turns it into the base, or a separate base model)."""
    base = load_base_model(cfg, base_path, quantized=quantized)
    if not quantized:
        base = place_on_gpu(base)
    if cfg.model.method == "full":
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(str(run.merged), dtype=torch_dtype(cfg.model.dtype))
        return place_on_gpu(tuned).eval(), base.eval()
    from peft import PeftModel
    tuned = PeftModel.from_pretrained(base, str(run.adapter)).eval()
    return tuned, None


def write_report(cfg: RunConfig, run_dir: str | os.PathLike, *, base_path: str | None = None,
                 tokenizer=None, eval_dataset=None, n_prompts: int = 5, max_new_tokens: int = 64,
                 quantized: bool | None = None, log=print) -> dict[str, Any]:
    """Write report_loss.png, report.json and report.md in `run_dir`; returns the report dict.

    base_path, tokenizer, eval_dataset: what the recipe already has (else resolved, loaded and
    prepared from the config, the data coming from the data cache). quantized: evaluate on a
    4-bit base (default: as trained, i.e. for qlora)."""

    run = RunDir(Path(run_dir).resolve())
    base_path = base_path or resolve_model_path(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg, base_path)
    if eval_dataset is None:
        eval_dataset = held_out_eval_dataset(cfg, tokenizer)
    if quantized is None:
        quantized = cfg.model.method == "qlora"
    source = run.merged if cfg.model.method == "full" else run.adapter

    tuned, separate_base = _load_models(cfg, run, base_path, quantized)
    as_base = (lambda: contextlib.nullcontext()) if separate_base is not None else tuned.disable_adapter
    base_model = separate_base if separate_base is not None else tuned
    batch_size = int(cfg.training.get("per_device_eval_batch_size", 8))

    metrics = {}
    if eval_dataset is not None and len(eval_dataset):
        metrics["fine_tuned"] = _metrics(*held_out_loss(tuned, eval_dataset, tokenizer.pad_token_id, batch_size))
        with as_base():
            metrics["base"] = _metrics(*held_out_loss(base_model, eval_dataset, tokenizer.pad_token_id,
                                                      batch_size))
    else:
        metrics = {"fine_tuned": _metrics(float("nan"), 0), "base": _metrics(float("nan"), 0)}

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    configured = cfg.data.chat_template if cfg.data.chat_template in NAMED_TEMPLATES else None
    stop_ids = stop_token_ids(tokenizer, configured)
    held = held_out_samples(cfg, tokenizer)
    if eval_dataset is not None and not cfg.data.packing and len(held) != len(eval_dataset):
        log(f"report: warning: {len(held)} held-out prompts but {len(eval_dataset)} eval rows")
    samples = [split_prompt(tokenizer, s) for s in held[: max(0, n_prompts)]]
    for sample in samples:
        if "messages" in sample:
            text, special = render_prompt(tokenizer, messages=sample["messages"])
        else:
            text, special = render_prompt(tokenizer, prompt=sample["prompt"])
        sample["prompt_text"] = text
        sample["fine_tuned"] = generate_text(tuned, tokenizer, text, add_special_tokens=special,
                                             settings=settings, stop_ids=stop_ids)["output"]
        with as_base():
            sample["base"] = generate_text(base_model, tokenizer, text, add_special_tokens=special,
                                           settings=settings, stop_ids=stop_ids)["output"]
    del tuned, base_model, separate_base
    _free_memory()

    checkpoint, state = newest_trainer_state(run)
    history = loss_history(state)
    plot = None
    if checkpoint is not None:
        atomic_write_bytes(run.root / REPORT_PNG, loss_plot_png(history, f"{cfg.name}: loss"))
        plot = REPORT_PNG

    eval_source = (f"data.eval {cfg.data.eval}" if cfg.data.eval else
                   f"data.validation_split {cfg.data.validation_split} of {cfg.data.train}"
                   if cfg.data.validation_split > 0 else "none")
    report = {
        "run": cfg.name, "model": cfg.model.name, "method": cfg.model.method,
        "fine_tuned_source": str(source.relative_to(run.root)) if source.is_relative_to(run.root) else str(source),
        "precision": ("4-bit base (as QLoRA trained)" if quantized else
                      f"{cfg.model.dtype} weights") + (", adapter attached / disabled"
                                                       if cfg.model.method != "full" else ""),
        "eval": {"source": eval_source, "samples": len(held),
                 "rows": len(eval_dataset) if eval_dataset is not None else 0},
        "base": metrics["base"], "fine_tuned": metrics["fine_tuned"],
        "generation": {"settings": settings.describe(), "greedy": settings.greedy,
                       "max_new_tokens": settings.max_new_tokens, "n_prompts": len(samples)},
        "samples": samples,
        "loss_curve": plot,
        "loss_curve_source": str(checkpoint.relative_to(run.root) / "trainer_state.json") if checkpoint else None,
        "loss_history": history,
    }
    atomic_write_json(run.root / REPORT_JSON, report)
    atomic_write_text(run.root / REPORT_MD, report_markdown(report))
    b, t = metrics["base"], metrics["fine_tuned"]
    if b["loss"] is not None:
        log(f"report: held-out loss base {b['loss']:.4f} (ppl {b['perplexity']:.2f}) -> fine-tuned "
            f"{t['loss']:.4f} (ppl {t['perplexity']:.2f}); {len(samples)} generations -> "
            f"{run.root / REPORT_MD}")
    else:
        log(f"report: no held-out data; {len(samples)} generations -> {run.root / REPORT_MD}")
    return report
