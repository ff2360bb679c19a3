"""Offline nodes for real (issue 12 item 4): jobs/prefetch.py fills a real Hugging Face hub cache
(models--ORG--NAME, datasets--ORG--NAME: blobs, snapshots, refs, tree listings) from a local copy of
a tiny model and dataset; a config that names them by hub id trains from that cache with
storage.offline=true and no network at all (a network namespace with only loopback, where
`unshare` can make one); with one file removed from the cache, --dry-run, --local and a Slurm
submission each refuse in one line naming the repository, the file and the prefetch command.

One training run (10 steps) is shared by the tests of this module; clean and sync run on copies.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, closed_port_url, subprocess_env
from ftlib.hub_cache import HubRepo, snapshot_problem
from ftlib.storage import RunDir, read_json, verify_manifest

MODEL = "ftlib-test/tiny-llama"
DATASET = "ftlib-test/alpaca-sample"
MODEL_FOLDER = "models--ftlib-test--tiny-llama"
DATASET_FOLDER = "datasets--ftlib-test--alpaca-sample"
TRAIN = ("training.max_steps=10", "training.save_steps=5", "training.logging_steps=5",
         "training.eval_strategy=no", "export.merged=false", "export.report=false")


def _network_namespace_works() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


NETNS = _network_namespace_works()


def without_network(args: list[str]) -> list[str]:
    """Run args with no network but loopback (W&B offline talks to its service over it)."""
    if not NETNS:
        return args
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *args]


def hub_overrides(cache: Path, root: Path) -> list[str]:
    return [f"model.name={MODEL}", f"data.train={DATASET}", "storage.offline=true",
            f"storage.hf_cache={cache}", f"storage.root={root}"]


def offline_env(hf_cache: Path, cache: Path) -> dict[str, str]:
    # storage.offline must switch huggingface_hub/datasets offline by itself, and storage.hf_cache
    # (the shared cache) must be where every read goes: HF_HOME is a user's own, empty cache, not
    # the shared one (the sbatch script exports HF_HOME itself; --local must not depend on it).
    # HF_ENDPOINT goes nowhere in case the namespace cannot be made.
    own = cache.parent / "users-own-hf-home"
    own.mkdir(exist_ok=True)
    env = subprocess_env(hf_cache, HF_HOME=str(own), HF_ENDPOINT=closed_port_url())
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


def run_prefetch(hf_cache: Path, cache: Path, source: Path) -> subprocess.CompletedProcess:
    # HF_HUB_OFFLINE=1 stays set (conftest): clusters often export it, and --from must still work.
    return subprocess.run([sys.executable, "jobs/prefetch.py", str(TINY_CONFIG), f"model.name={MODEL}",
                           f"data.train={DATASET}", f"storage.hf_cache={cache}", "--from", str(source)],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory, hf_cache):
    from ftlib.tiny import build_model, write_sample_dataset

    base = tmp_path_factory.mktemp("offline-hub")
    source = base / "source"
    build_model(source / MODEL)
    (source / "datasets" / DATASET / "data").mkdir(parents=True)
    write_sample_dataset(source / "datasets" / DATASET / "data" / "train.jsonl", n=96)
    cache = base / "hf"
    fetched = run_prefetch(hf_cache, cache, source)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    print(f"network namespace without network: {NETNS}")
    args = [sys.executable, "jobs/submit.py", str(TINY_CONFIG), "--local", *hub_overrides(cache, base / "runs"), *TRAIN]
    trained = subprocess.run(without_network(args), cwd=REPO, env=offline_env(hf_cache, cache),
                             capture_output=True, text=True, timeout=900)
    return {"base": base, "source": source, "cache": cache, "prefetch": fetched, "train": trained,
            "run": RunDir(base / "runs" / "tiny")}


def _snapshot(cache: Path, folder: str) -> Path:
    return cache / "hub" / folder / "snapshots" / (cache / "hub" / folder / "refs" / "main").read_text()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prefetch_from_a_local_copy_writes_the_hub_layout_huggingface_hub_reads(world):
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    cache, source = world["cache"] / "hub", world["source"]
    for repo_type, repo_id, folder, copy in (("model", MODEL, MODEL_FOLDER, source / MODEL),
                                             ("dataset", DATASET, DATASET_FOLDER, source / "datasets" / DATASET)):
        snap = _snapshot(world["cache"], folder)
        assert re.fullmatch(r"[0-9a-f]{40}", snap.name)
        assert snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache, local_files_only=True) == str(snap)
        originals = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
        cached = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        assert cached == originals
        for name in originals:
            link = snap / name
            assert link.is_symlink() and link.resolve().parent == cache / folder / "blobs"
            assert _sha(link) == _sha(copy / name)
            assert try_to_load_from_cache(repo_id, name, cache_dir=cache, repo_type=repo_type) == str(link)
        assert (cache / folder / "trees" / f"{snap.name}.json").is_file()   # what makes a missing file known


def test_a_hub_named_config_trains_offline_from_the_cache(world):
    proc, run = world["train"], world["run"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verify_manifest(run) == []
    state = read_json(run.state)
    assert state["status"] == "completed" and state["step"] == 10
    model_snapshot = _snapshot(world["cache"], MODEL_FOLDER)
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_snapshot)
    written = (run.root / "config.yaml").read_text()
    assert f"name: {MODEL}" in written and f"train: {DATASET}" in written and "offline: true" in written
    log = run.log.read_text()
    assert f"model: {MODEL} (qlora)" in log
    assert any(DATASET in line and "96 rows" in line for line in log.splitlines())   # the copy's 96, not 128
    assert "Traceback" not in proc.stderr


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_one_file_missing_from_the_cache_is_refused_at_submit_in_every_mode(world, hf_cache):
    broken = world["base"] / "broken-hf"
    shutil.copytree(world["cache"], broken, symlinks=True)
    blob = (_snapshot(broken, MODEL_FOLDER) / "tokenizer.json").resolve()
    blob.unlink()
    for mode in ("--dry-run", "--local", None):     # None: a Slurm submission (refused before sbatch)
        root = world["base"] / f"refused{mode or '-slurm'}"
        args = [sys.executable, "jobs/submit.py", str(TINY_CONFIG), *hub_overrides(broken, root), *TRAIN]
        start = time.monotonic()
        proc = subprocess.run(without_network(args + ([mode] if mode else [])), cwd=REPO,
                              env=offline_env(hf_cache, broken), capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - start
        _refused(proc, f"model.name: {MODEL} incomplete", "missing tokenizer.json",
                 f"python jobs/prefetch.py {TINY_CONFIG}", "storage.offline is true")
        assert not root.exists(), f"{mode}: something was written before the refusal"
        assert elapsed < 60, f"{mode}: {elapsed:.0f} s (loose ceiling; most of it is imports)"
    # the dataset is checked the same way (in this process: the subprocesses above showed the modes)
    from ftlib.config import ConfigError, load_config
    from ftlib.model import check_model_available
    from ftlib.prefetch import prefetch
    (_snapshot(broken, DATASET_FOLDER) / "data" / "train.jsonl").unlink()
    shutil.copy((_snapshot(world["cache"], MODEL_FOLDER) / "tokenizer.json").resolve(), blob)
    cfg = load_config(TINY_CONFIG, hub_overrides(broken, world["base"] / "refused-data"))
    with pytest.raises(ConfigError, match=f"data.train: {DATASET} incomplete .*missing data/train.jsonl"):
        check_model_available(cfg)
    # prefetch repairs the cache it is pointed at
    (_snapshot(broken, MODEL_FOLDER) / "config.json").resolve().unlink()
    prefetch(cfg, source=world["source"], log=lambda _: None)
    for repo in (HubRepo(MODEL, "model", None, "model.name"), HubRepo(DATASET, "dataset", None, "data.train")):
        assert snapshot_problem(repo, broken / "hub") is None
    check_model_available(cfg)


def _listed(output: str, verb: str) -> dict[str, str]:
    return dict(re.findall(rf": {verb} (\S+) \(([^)]+)\)$", output, flags=re.M))


def test_clean_prunes_the_finished_offline_run_exactly_as_its_dry_run_says(world):
    root = world["base"] / "clean-root"
    shutil.copytree(world["run"].root, root / "tiny", symlinks=True)
    run = RunDir(root / "tiny")
    before = sorted(p.name for p in run.checkpoints.iterdir())
    assert before == ["checkpoint-10", "checkpoint-5"]
    dry = subprocess.run([sys.executable, "jobs/clean.py", "--root", str(root), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    planned = _listed(dry.stdout, "would remove")
    assert list(planned) == [str(run.checkpoints / "checkpoint-5")]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == before     # a dry run removes nothing
    real = subprocess.run([sys.executable, "jobs/clean.py", "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert real.returncode == 0, real.stderr[-2000:]
    assert _listed(real.stdout, "removed") == planned
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-10"]
    assert verify_manifest(run) == []


def test_sync_dry_run_lists_the_offline_wandb_run(world):
    from ftlib.sync import SYNC_RECORD, sync_state
    run = world["run"]
    assert sync_state(run) == "unsynced (1 of 1 dirs)"
    proc = subprocess.run([sys.executable, "jobs/sync.py", "--root", str(run.root.parent), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    offline = next(run.wandb.glob("offline-run-*"))
    assert str(offline) in proc.stdout and "Would sync 1 run(s)" in proc.stdout
    assert not (run.root / SYNC_RECORD).exists()
