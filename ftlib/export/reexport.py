"""Re-make the exports of a finished run from its config.yaml and adapter (jobs/export.py; the
command line is parsed in cli.py).

A complete export that matches its manifest is left alone; missing or changed files are made
again; the manifest is removed while repairing and written last. It runs under the run's lease
(locks.run_lease): never beside the job training the run or another export of it; leftovers of
an interrupted export (staging folders, temp files) are removed first."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import ConfigError, load_config
from ..console import quiet_progress_bars
from ..model import load_tokenizer, resolve_model_path
from ..report import write_report
from ..locks import run_lease
from ..storage import DiskFull, LeaseHeld, RunDir, clean_leftovers, damaged_entries, read_json, write_manifest
from .gguf import GGUF_TYPES, check_gguf_types, normalize_type
from .publish import export_derived


def damaged_files(run: RunDir, manifest: dict) -> list[str]:
    """Paths (relative to the run) that the manifest lists but are missing or differ."""
    return list(damaged_entries(run, manifest.get("files", [])))


def _gguf_type_of(cfg, name: str) -> str | None:
    prefix = f"{cfg.name}-"
    if name.startswith(prefix) and name.endswith(".gguf") and name[len(prefix):-5] in GGUF_TYPES:
        return name[len(prefix):-5]
    return None


def wanted_exports(cfg, run: RunDir, manifest: dict, requested: list[str], ollama: bool) -> dict | None:
    """Set cfg.export to everything that should exist, and return what to record in the manifest.

    What should exist: --gguf/--ollama, else what an earlier export.py call recorded in the
    manifest ("export"), else the run's export section; plus every export the manifest lists, so
    a deleted file is re-made whoever first asked for it. The order of the GGUF types decides
    which file the Modelfile points at, so it is kept. The returned record is None when the
    exports are exactly the config's (a run published by training keeps its manifest as it was)."""
    recorded = manifest.get("export") or {}
    listed = [Path(e["path"]) for e in manifest.get("files", [])]
    gguf_rel, merged_rel = run.gguf.relative_to(run.root), run.merged.relative_to(run.root)
    from_files = [t for t in (_gguf_type_of(cfg, p.name) for p in listed if p.parent == gguf_rel) if t]
    first = requested or list(recorded.get("gguf") or []) or list(cfg.export.gguf)
    types = list(dict.fromkeys([*first, *cfg.export.gguf, *from_files]))
    wants_ollama = bool(ollama or recorded.get("ollama") or cfg.export.ollama
                        or run.modelfile.relative_to(run.root) in listed)
    if wants_ollama and not types:
        raise ConfigError("--ollama needs a GGUF file to point at: add --gguf q8_0 (or set export.gguf)")
    record = None
    if types != list(cfg.export.gguf) or wants_ollama != cfg.export.ollama:
        record = {"gguf": types, "ollama": wants_ollama}
    cfg.export.gguf = types
    cfg.export.ollama = wants_ollama
    cfg.export.merged = bool(cfg.export.merged or any(merged_rel in p.parents for p in listed))
    return record


def reexport(run_dir: str | os.PathLike, *, gguf: str | None = None, ollama: bool = False,
             force: bool = False, report: bool = False, log=print) -> str:
    """'unchanged' when the export was complete and verified, else 'updated'."""
    run = RunDir(Path(run_dir).expanduser().resolve())
    if not run.config.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run.config)
    requested: list[str] = []
    if gguf is not None:
        try:
            requested = [normalize_type(t) for t in gguf.split(",") if t.strip()]
        except ValueError as exc:
            raise ConfigError(f"--gguf: {exc}") from None
    full = cfg.model.method == "full"
    source = run.merged if full else run.adapter
    marker = source / ("config.json" if full else "adapter_config.json")
    if not marker.is_file():
        raise ConfigError(f"{run.root}: no {'merged model' if full else 'adapter'} at {source}: the run has "
                          "not finished training (python jobs/status.py shows its state)")
    if cfg.storage.offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

    try:
        with run_lease(run, "export", log=log):
            clean_leftovers(run, log)
            manifest = read_manifest(run, log)
            status = _export_locked(cfg, run, manifest, source, requested, ollama,
                                    force=force or (run.manifest.exists() and manifest is None), log=log)
    except (LeaseHeld, DiskFull) as exc:   # training it, another export, no room: one line, exit 2
        raise ConfigError(str(exc)) from None
    if report:
        quiet_progress_bars()
        write_report(cfg, run.root, log=log)
    return status


def read_manifest(run: RunDir, log=print) -> dict | None:
    """The manifest, or None when there is none or it is damaged (then every export is re-made:
    nothing on disk can be checked against it)."""
    try:
        manifest = read_json(run.manifest)
        if manifest is not None and isinstance(manifest.get("files"), list):
            return manifest
    except (ValueError, AttributeError):
        pass
    if run.manifest.exists():
        log(f"export: {run.manifest.name} is damaged (unreadable); re-making every export")
    return None


def _export_locked(cfg, run: RunDir, manifest: dict | None, source: Path, requested: list[str], ollama: bool, *,
                   force: bool, log) -> str:
    full = cfg.model.method == "full"
    damaged = damaged_files(run, manifest) if manifest is not None else []
    record = wanted_exports(cfg, run, manifest or {}, requested, ollama)
    source_rel = str(source.relative_to(run.root))
    lost = [p for p in damaged if p.startswith(source_rel + "/")]
    if lost:
        raise ConfigError(f"{run.root}: {lost[0]} is missing or differs from manifest.json; it is the "
                          "trained source of every export and cannot be re-made: restore it or train again")
    derived_roots = [run.merged, run.gguf, run.modelfile]
    unknown = [p for p in damaged if not any(run.root / p == r or r in (run.root / p).parents
                                             for r in derived_roots)]
    if unknown:
        raise ConfigError(f"{run.root}: {unknown[0]} is missing or differs from manifest.json and is not "
                          "an export that can be re-made")
    wanted = []
    if not full and (cfg.export.merged or cfg.export.gguf):
        wanted.append(run.merged / "config.json")
    wanted += [run.gguf / f"{cfg.name}-{q}.gguf" for q in cfg.export.gguf]
    if cfg.export.ollama:
        wanted.append(run.modelfile)
    missing = [p for p in wanted if not p.exists()]
    to_make = [q for q in cfg.export.gguf if force or run.gguf / f"{cfg.name}-{q}.gguf" in missing
               or f"{run.gguf.relative_to(run.root)}/{cfg.name}-{q}.gguf" in damaged]
    if to_make:
        try:
            check_gguf_types(to_make)   # a K-quant needs llama-quantize: say so before any work
        except ValueError as exc:
            raise ConfigError(f"{run.root}: GGUF export: {exc}") from None
    same_request = manifest is not None and manifest.get("export") == record
    if manifest is not None and not damaged and not missing and same_request and not force:
        log(f"export of {run.root} is complete and matches manifest.json; nothing to do (--force re-makes it)")
        status = "unchanged"
    else:
        for path in damaged:
            log(f"export: {path} is missing or differs from the manifest; re-making it")
        for path in missing:
            if str(path.relative_to(run.root)) not in damaged:
                log(f"export: {path.relative_to(run.root)} is missing; making it")
        if not same_request and manifest is not None:
            log(f"export: exports requested: gguf {', '.join(cfg.export.gguf) or 'none'}, "
                f"ollama {'yes' if cfg.export.ollama else 'no'}")
        # Incomplete from here until the new manifest is written.
        run.manifest.unlink(missing_ok=True)
        for rel in damaged:
            path = run.root / rel
            if not full and (path == run.merged or run.merged in path.parents):
                shutil.rmtree(run.merged, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        quiet_progress_bars()
        base_path = resolve_model_path(cfg)
        tokenizer = load_tokenizer(cfg, base_path)
        export_derived(cfg, run, base_path, tokenizer, force=force, log=log)
        extra = {k: v for k, v in (manifest or {}).items() if k not in ("run", "files", "export")}
        extra.update(model=cfg.model.name, method=cfg.model.method)
        if record is not None:
            extra["export"] = record
        write_manifest(run, extra)
        log(f"export: manifest -> {run.manifest}")
        status = "updated"
    return status
