"""The hub cache on machines without network: the network asked once (short timeout, no retries),
a repository's completeness read from huggingface_hub's own cache layout, the one-line refusal at
submission, and prefetch --from (a local copy served to huggingface_hub's download code)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, closed_port_url, subprocess_env
from ftlib import hub_cache
from ftlib.config import ConfigError
from ftlib.hub_cache import HubRepo, hub_dataset_source, hub_unreachable, snapshot_problem
from ftlib.model import check_model_available, hub_repos, resolve_model_path
from ftlib.prefetch import prefetch

MODEL = "ftlib-test/fake-model"
DATASET = "ftlib-test/fake-data"


class Listener:
    """A TCP port on 127.0.0.1 that counts connections and either never answers (a network that
    swallows packets: the probe must time out) or answers every request with HTTP 404."""

    def __init__(self, answer: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.answer = answer
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.answer:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture(autouse=True)
def fresh_probe():
    hub_cache.forget_probe()
    yield
    hub_cache.forget_probe()


@pytest.fixture
def online_env(monkeypatch):
    """No HF_HUB_OFFLINE (conftest sets it for the session): the probe decides."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------- the network, asked once
def test_offline_flag_answers_without_any_connection(monkeypatch):
    listener = Listener()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", listener.url)
    assert hub_unreachable() == "HF_HUB_OFFLINE=1 is set"
    assert listener.connections == 0
    listener.close()


def test_a_refused_connection_is_unreachable(online_env):
    url = closed_port_url()
    online_env.setenv("HF_ENDPOINT", url)
    reason = hub_unreachable()
    assert reason.startswith(f"{url} unreachable") and "refused" in reason.lower()


def test_a_silent_network_times_out_once_and_is_remembered(online_env):
    listener = Listener(answer=False)
    online_env.setenv("HF_ENDPOINT", listener.url)
    reason = hub_unreachable(timeout=0.5)
    assert reason is not None and listener.url in reason
    assert hub_unreachable(timeout=0.5) == reason
    assert listener.connections == 1          # asked once for the process, never retried
    listener.close()


def test_any_http_answer_means_reachable(online_env):
    listener = Listener(answer=True)           # a 404 still proves the network works
    online_env.setenv("HF_ENDPOINT", listener.url)
    assert hub_unreachable() is None
    assert hub_unreachable() is None and listener.connections == 1
    listener.close()


# ---------------------------------------------------------------------------- a cache filled by prefetch --from
def write_source(root: Path, shards: bool = False) -> Path:
    """Copies of a model repository and a dataset repository, as DIR/ORG/NAME and DIR/datasets/ORG/NAME."""
    model = root / MODEL
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    if shards:
        (model / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 64)
        (model / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 64)
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    else:
        (model / "model.safetensors").write_bytes(os.urandom(256))
    (model / ".git").mkdir()                      # a clone's git data is not part of the repository
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    data = root / "datasets" / DATASET / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"instruction": "Say hi.", "input": "", "output": "hi"}\n')
    return root


@pytest.fixture
def filled(tmp_path, tiny_config):
    """A config naming hub repositories, and its cache filled by prefetch from a local copy."""
    source = write_source(tmp_path / "source")
    cfg = tiny_config(f"model.name={MODEL}", f"data.train={DATASET}", "storage.offline=true",
                      f"storage.hf_cache={tmp_path / 'hf'}")
    lines = []
    assert prefetch(cfg, source=source, log=lines.append) == [MODEL, DATASET]
    return cfg, tmp_path / "hf" / "hub", source


def snapshot_dir(cache: Path, folder: str) -> Path:
    commit = (cache / folder / "refs" / "main").read_text()
    return cache / folder / "snapshots" / commit


def test_prefetch_from_a_copy_writes_huggingface_hubs_own_layout(filled):
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    cfg, cache, source = filled
    snap = snapshot_dir(cache, "models--ftlib-test--fake-model")
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    weights = snap / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == cache / "models--ftlib-test--fake-model" / "blobs"
    assert weights.read_bytes() == (source / MODEL / "model.safetensors").read_bytes()
    assert (cache / "models--ftlib-test--fake-model" / "trees" / f"{snap.name}.json").is_file()
    # huggingface_hub itself finds it, with no network
    assert snapshot_download(MODEL, cache_dir=cache, local_files_only=True) == str(snap)
    assert try_to_load_from_cache(MODEL, "config.json", cache_dir=cache) == str(snap / "config.json")
    data_snap = snapshot_dir(cache, "datasets--ftlib-test--fake-data")
    assert (data_snap / "data" / "train.jsonl").read_text().startswith('{"instruction": "Say hi."')
    assert snapshot_problem(HubRepo(MODEL, "model", None, "model.name"), cache) is None
    check_model_available(cfg)                      # complete: no refusal
    assert resolve_model_path(cfg) == str(snap)      # offline runs load the snapshot directory
    assert hub_dataset_source(DATASET, cache_dir=cache) == str(data_snap)


def test_the_same_copy_is_the_same_snapshot_and_a_changed_copy_a_new_one(filled, tiny_config, tmp_path):
    cfg, cache, source = filled
    first = snapshot_dir(cache, "models--ftlib-test--fake-model").name
    prefetch(cfg, source=source, log=lambda _: None)
    assert snapshot_dir(cache, "models--ftlib-test--fake-model").name == first
    (source / MODEL / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    prefetch(cfg, source=source, log=lambda _: None)
    second = snapshot_dir(cache, "models--ftlib-test--fake-model")
    assert second.name != first and json.loads((second / "config.json").read_text())["hidden_size"] == 128


def _refusal(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        check_model_available(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert f"python jobs/prefetch.py {cfg.source}" in message
    return message


def test_a_deleted_blob_is_named_with_its_repository(filled):
    cfg, cache, _ = filled
    (snapshot_dir(cache, "models--ftlib-test--fake-model") / "tokenizer.json").resolve().unlink()
    message = _refusal(cfg)
    assert "model.name: ftlib-test/fake-model incomplete" in message and "missing tokenizer.json" in message
    assert "storage.offline is true" in message


def test_a_deleted_blob_is_found_without_the_tree_listing(filled):
    cfg, cache, _ = filled
    for tree in (cache / "models--ftlib-test--fake-model" / "trees").iterdir():
        tree.unlink()
    (snapshot_dir(cache, "models--ftlib-test--fake-model") / "model.safetensors").resolve().unlink()
    assert "missing model.safetensors" in _refusal(cfg)


def test_a_missing_ref_and_a_missing_repository(filled):
    cfg, cache, _ = filled
    (cache / "datasets--ftlib-test--fake-data" / "refs" / "main").unlink()
    message = _refusal(cfg)
    assert "data.train: ftlib-test/fake-data has no snapshot for revision main" in message
    import shutil
    shutil.rmtree(cache / "models--ftlib-test--fake-model")
    assert "model.name: ftlib-test/fake-model not in the HF cache" in _refusal(cfg)


def test_a_missing_shard_of_an_index(tmp_path, tiny_config):
    source = write_source(tmp_path / "source", shards=True)
    cfg = tiny_config(f"model.name={MODEL}", "storage.offline=true", f"storage.hf_cache={tmp_path / 'hf'}")
    prefetch(cfg, source=source, log=lambda _: None)
    cache = tmp_path / "hf" / "hub"
    for tree in (cache / "models--ftlib-test--fake-model" / "trees").iterdir():
        tree.unlink()                                # only the index can tell now
    (snapshot_dir(cache, "models--ftlib-test--fake-model") / "model-00002-of-00002.safetensors").unlink()
    assert "missing model-00002-of-00002.safetensors" in _refusal(cfg)


def test_online_runs_and_local_models_are_not_checked(tmp_path, tiny_config, online_env):
    listener = Listener(answer=True)
    online_env.setenv("HF_ENDPOINT", listener.url)
    check_model_available(tiny_config(f"model.name={MODEL}", f"storage.hf_cache={tmp_path}"))  # will download
    assert listener.connections == 1
    hub_cache.forget_probe()
    cfg = tiny_config()                              # builtin model, local data: nothing to ask
    assert hub_repos(cfg) == []
    check_model_available(cfg)
    assert listener.connections == 1
    listener.close()


def test_no_network_refuses_an_uncached_model_within_the_probe_timeout(tmp_path, tiny_config, online_env):
    listener = Listener(answer=False)
    online_env.setenv("HF_ENDPOINT", listener.url)
    cfg = tiny_config(f"model.name={MODEL}", f"storage.hf_cache={tmp_path}")
    start = time.monotonic()
    message = _refusal(cfg)
    assert time.monotonic() - start < 10          # loose: the probe's 2 s, never a minute of retries
    assert f"{listener.url} unreachable" in message and str(tmp_path / "hub") in message
    assert listener.connections == 1
    listener.close()


def test_prefetch_refuses_in_one_line_without_network_or_copy(tmp_path, tiny_config, online_env):
    online_env.setenv("HF_ENDPOINT", closed_port_url())
    cfg = tiny_config(f"model.name={MODEL}", f"storage.hf_cache={tmp_path}")
    with pytest.raises(ConfigError, match="prefetch needs the Hub, which this machine cannot reach .* --from DIR"):
        prefetch(cfg, log=lambda _: None)
    write_source(tmp_path / "source")
    other = tiny_config("model.name=ftlib-test/other", f"storage.hf_cache={tmp_path}")
    with pytest.raises(ConfigError, match=r"ftlib-test/other not found at --from .*expected .*ftlib-test/other/"):
        prefetch(other, source=tmp_path / "source", log=lambda _: None)
    assert not (tmp_path / "hub" / "models--ftlib-test--other" / "snapshots").exists()


def test_mistral_dry_run_without_network_is_one_line_exit_2_and_one_connection(tmp_path, hf_cache):
    """issue 13: 41 s of hub retries before; now one probe, one line, exit 2."""
    listener = Listener(answer=False)
    env = subprocess_env(hf_cache, HF_ENDPOINT=listener.url, HF_HOME=str(tmp_path / "empty"),
                         FTLIB_STORAGE=str(tmp_path / "runs"))
    env.pop("HF_HUB_OFFLINE", None)
    from ftlib.config import load_config
    load_config(REPO / "configs" / "mistral.yaml")   # the field tables' cache, as any earlier command leaves it
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/submit.py", "configs/mistral.yaml", "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "mistralai/Mistral-7B-v0.1" in errors[0]
    assert str(tmp_path / "empty" / "hub") in errors[0]
    assert "python jobs/prefetch.py configs/mistral.yaml" in errors[0]
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr + proc.stdout
    assert listener.connections == 1
    # "well under 10 s", asserted loosely: ~0.5 s on an idle 2-core machine (no torch, transformers
    # or peft imported before the refusal: config/hint_cache.py)
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert not (tmp_path / "runs").exists()
    listener.close()


def test_prefetch_refuses_a_clone_made_without_git_lfs(tmp_path, tiny_config):
    source = write_source(tmp_path / "source")
    pointer = source / MODEL / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    cfg = tiny_config(f"model.name={MODEL}", f"storage.hf_cache={tmp_path / 'hf'}")
    with pytest.raises(ConfigError, match=rf"{pointer} is a git-lfs pointer, not the file; run `git lfs pull`"):
        prefetch(cfg, source=source, log=lambda _: None)
    assert not (tmp_path / "hf").exists()          # refused before anything was written


def test_storage_hf_cache_is_where_a_run_reads_in_every_mode(tiny_config, tmp_path, monkeypatch):
    from ftlib.model import hf_cache_dir
    monkeypatch.delenv("SLURM_SUBMIT_DIR", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "users-own"))
    assert hf_cache_dir(tiny_config(f"storage.hf_cache={tmp_path / 'shared'}")) == tmp_path / "shared"   # not HF_HOME
    assert hf_cache_dir(tiny_config("storage.hf_cache=rel/hf")) == Path("rel/hf")        # --local: from here
    # In a job a relative path is the submission directory's, as the sbatch script's HF_HOME is
    # (a container's job runs in the run directory).
    monkeypatch.setenv("SLURM_SUBMIT_DIR", str(tmp_path / "submitted-here"))
    assert hf_cache_dir(tiny_config("storage.hf_cache=rel/hf")) == tmp_path / "submitted-here" / "rel" / "hf"
    assert hf_cache_dir(tiny_config(f"storage.hf_cache={tmp_path / 'shared'}")) == tmp_path / "shared"
