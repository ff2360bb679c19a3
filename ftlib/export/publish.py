"""Publish a run's artifacts: adapter, merged model, GGUF files, Modelfile, then the manifest.

Each artifact appears under its final name complete or not at all (staging directory or temp
file + rename). The manifest is written last; its presence means the export is complete. An
interrupted export re-run makes only what is missing; a complete one is left as it is. A full
disk is storage.DiskFull naming the artifact and the room it needs; results get the shared modes
(the user's umask, never group/world-writable).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..model import merge_adapter, torch_dtype
from ..plan import GGUF_BYTES_PER_WEIGHT
from ..storage import RunDir, disk_full_guard, make_dirs, read_json, share, staging_dir, write_manifest
from .gguf import export_gguf
from .ollama import write_modelfile


def save_trained(trainer, tokenizer, final: Path) -> Path:
    """Trainer.save_model into `final`, atomically, from every rank.

    Trainer.save_model gathers sharded (ZeRO-3 / FSDP) tensors, a collective that all ranks must
    join, then writes on rank 0 only; a plain save_pretrained would write zero-sized LoRA tensors
    (FIELD-NOTES). Other ranks pass a path that is never written.
    """
    if not trainer.args.should_save:
        trainer.save_model(str(final.parent / f".{final.name}.not-written-by-rank-{trainer.args.process_index}"))
        return final
    with staging_dir(final) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return final


def save_merged(cfg: RunConfig, run: RunDir, base_path: str, tokenizer, log=print) -> Path:
    merged = merge_adapter(cfg, base_path, run.adapter, dtype=torch_dtype(cfg.export.merged_dtype))
    weights = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    with staging_dir(run.merged, expected_bytes=weights + (1 << 20)) as tmp:   # + tokenizer, config
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    log(f"export: merged model -> {run.merged}")
    return run.merged


def gguf_bytes(merged: Path, qtype: str) -> int:
    """About the size of a GGUF of `qtype` made from the merged model's safetensors."""
    weights = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    dtype = str((read_json(merged / "config.json") or {}).get("dtype") or "float32")
    per_weight = 4 if dtype == "float32" else 2
    return int(weights / per_weight * GGUF_BYTES_PER_WEIGHT.get(qtype.lower(), 2.0))


def export_derived(cfg: RunConfig, run: RunDir, base_path: str, tokenizer, *, force: bool = False,
                   log=print) -> dict[str, Any]:
    """Merged model, GGUF files and Modelfile from the adapter on disk; skips what is complete."""
    made: dict[str, Any] = {}
    if cfg.model.method != "full" and (cfg.export.merged or cfg.export.gguf):
        if force or not (run.merged / "config.json").exists():
            save_merged(cfg, run, base_path, tokenizer, log=log)
        made["merged"] = str(run.merged)
    if cfg.export.gguf:
        make_dirs(run.gguf)
        files = []
        for qtype in cfg.export.gguf:
            out = run.gguf / f"{cfg.name}-{qtype}.gguf"
            if force or not out.exists():
                # Training tokenized rendered text without automatic special tokens (the chat
                # template writes BOS itself), so llama.cpp must not add one either.
                with disk_full_guard(out, lambda: gguf_bytes(run.merged, qtype)):
                    export_gguf(run.merged, out, qtype,
                                add_bos=None if cfg.data.format == "completion" else False)
                share(out)   # export_gguf's temp file is mkstemp's 0600
                log(f"export: GGUF {qtype} -> {out}")
            files.append(str(out))
        made["gguf"] = files
        if cfg.export.ollama:
            system = cfg.export.system_prompt or cfg.data.system_prompt
            write_modelfile(run.modelfile, Path(files[0]).name, tokenizer, system=system)
            made["modelfile"] = str(run.modelfile)
    return made


def publish_artifacts(cfg: RunConfig, run: RunDir, trainer, tokenizer, base_path: str,
                      log=print) -> dict[str, Any]:
    """Called on every rank; everything after the collective save runs on rank 0 only."""
    made: dict[str, Any] = {}
    if cfg.model.method == "full":  # no adapter: the trained model itself is the merged model
        made["merged"] = str(save_trained(trainer, tokenizer, run.merged))
    else:
        made["adapter"] = str(save_trained(trainer, tokenizer, run.adapter))
        log(f"export: adapter -> {run.adapter}")
    if not trainer.args.should_save:
        return made
    made.update(export_derived(cfg, run, base_path, tokenizer, log=log))
    write_manifest(run, {"model": cfg.model.name, "method": cfg.model.method})
    log(f"export: manifest -> {run.manifest}")
    return made
