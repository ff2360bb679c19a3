"""Prefetch: on a login node with internet, put a config's model, tokenizer and hub datasets into
the shared Hugging Face cache (storage.hf_cache), so jobs on offline compute nodes
(storage.offline: true, HF_HUB_OFFLINE=1) find them there."""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .data import is_local_file
from .model import hf_cache_dir, hub_cache_dir
from .tiny import BUILTIN_PREFIX


def prefetch(cfg: RunConfig, log=print) -> list[str]:
    """Download what the run needs; returns what was fetched (local paths need nothing)."""
    fetched = []
    name = cfg.model.name
    if name.startswith(BUILTIN_PREFIX) or Path(name).expanduser().is_dir():
        log(f"model {name}: local, nothing to fetch")
    else:
        from huggingface_hub import snapshot_download
        # HF_TOKEN, for gated models, is read from the environment by huggingface_hub itself.
        path = snapshot_download(name, revision=cfg.model.revision, cache_dir=hub_cache_dir(cfg))
        log(f"model {name}: {path}")
        fetched.append(name)
    for spec in (cfg.data.train, cfg.data.eval):
        if not spec or is_local_file(spec) or Path(spec).expanduser().exists():
            continue
        import datasets
        datasets.load_dataset(spec, cfg.data.subset, split=cfg.data.split,
                              cache_dir=str(hf_cache_dir(cfg) / "datasets"))
        log(f"dataset {spec}: cached in {hf_cache_dir(cfg) / 'datasets'}")
        fetched.append(spec)
    return fetched
