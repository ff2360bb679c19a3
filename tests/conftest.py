"""Shared fixtures: no network, W&B offline, one tiny builtin model per test session."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
SAMPLE_DATA = REPO / "configs" / "data" / "alpaca_sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """A shared HF cache for the session: builtin tiny models are built once into it."""
    path = tmp_path_factory.mktemp("hf-cache")
    os.environ["FTLIB_HF_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_config(tmp_path, hf_cache):
    """load_config(configs/tiny.yaml) with storage under tmp_path, plus overrides."""
    from ftlib.config import load_config

    def make(*overrides: str, root: Path | None = None):
        base = [f"storage.root={root or tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
                f"data.train={SAMPLE_DATA}"]
        return load_config(TINY_CONFIG, base + list(overrides))

    return make


def subprocess_env(hf_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, FTLIB_HF_CACHE=str(hf_cache), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_for(predicate, timeout=180, poll=0.2, what="condition"):
    """Poll predicate() until it is true; fail naming `what` after timeout seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
