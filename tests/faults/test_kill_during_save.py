"""SIGKILL inside checkpoint saves and inside each export, and damaged checkpoints and artifacts.

tests/faults/fault_driver.py runs the real recipe and jobs/export.py's code in forked children and
kills them at named points (the save_total_limit gap, the middle of a rotation) and at random,
seeded points inside saves and export stages (merged, GGUF, Modelfile, manifest): 20+ kills in all.
What must hold: a rerun never resumes from a partial or damaged checkpoint and says which file was
bad, the previous checkpoint still loads, leftovers are cleaned by the rerun and by jobs/export.py,
no manifest ever lists a missing file or one whose sha256 differs, and the run still ends bitwise
equal to an uninterrupted one. Replay a failure with FTLIB_FAULT_SEED=<the seed printed>.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SAMPLE_DATA, subprocess_env
from ftlib.storage import RunDir, sha256_file, verify_manifest

DRIVER = Path(__file__).resolve().parent / "fault_driver.py"
SAVE_TRIALS, EXPORT_TRIALS = 8, 10          # + 2 named save kills = 20 kills


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("FTLIB_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"fault seed {value} (replay: FTLIB_FAULT_SEED={value})")
    return value


def drive(hf_cache, *args, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(hf_cache, OMP_NUM_THREADS="1"), timeout=timeout)
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def saves(tmp_path_factory, hf_cache, seed) -> dict:
    root = tmp_path_factory.mktemp("saves")
    drive(hf_cache, "save-trials", root / "saves.json", root, seed, SAVE_TRIALS, "training.max_steps=12",
          f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}")
    return json.loads((root / "saves.json").read_text())


@pytest.fixture(scope="module")
def exports(saves, hf_cache, seed) -> dict:
    run_dir = Path(saves["final"]["run_dir"])
    drive(hf_cache, "export-trials", run_dir.parent / "exports.json", run_dir, seed, EXPORT_TRIALS)
    return json.loads((run_dir.parent / "exports.json").read_text())


def resumed_from(log: str) -> str | None:
    found = re.findall(r"resuming from \S+/(checkpoint-\d+) \(step \d+\)", log)
    return found[-1] if found else None


# ---------------------------------------------------------------------------- checkpoint saves
def test_a_kill_between_save_and_marker_with_save_total_limit_1_keeps_the_previous_checkpoint(saves):
    gap, rerun = saves["trials"][0], saves["trials"][1]
    assert gap["point"] == "before-marker" and gap["killed"], gap["log"][-2000:]
    # The Trainer used to delete checkpoint-2 before ftlib's marker was on checkpoint-3.
    assert gap["after"]["checkpoints"] == {
        "checkpoint-3": {"marked": False, "problem": "no completeness marker (the save was interrupted)"},
        "checkpoint-2": {"marked": True, "problem": None}}
    assert gap["newest_loads"] is True
    assert "checkpoint: skipping checkpoint-3: no completeness marker" in rerun["log"]
    assert resumed_from(rerun["log"]) == "checkpoint-2"       # never step 0


def test_a_kill_in_the_middle_of_a_rotation_leaves_one_complete_checkpoint_and_the_rerun_cleans(saves):
    rotation, after = saves["trials"][1], saves["trials"][2]
    assert rotation["point"] == "mid-rotation" and rotation["killed"]
    assert rotation["after"]["newest_complete"] == "checkpoint-3"
    assert rotation["after"]["leftovers"] == ["checkpoints/.checkpoint-2.deleting"]
    assert "cleanup: removed checkpoints/.checkpoint-2.deleting" in after["log"]
    assert "checkpoints/.checkpoint-2.deleting" not in after["after"]["leftovers"]


def test_random_kills_inside_saves_never_resume_from_a_partial_checkpoint(saves):
    trials = saves["trials"]
    assert len(trials) == SAVE_TRIALS + 2
    torn = 0
    for previous, trial in zip(trials, trials[1:]):
        where = f"trial {trial['index']} ({trial['point']}, step {trial['step']}, call {trial.get('event')} of {trial.get('events')})"
        assert trial["killed"], f"{where} was not killed: {trial['log'][-2000:]}"
        # The rerun resumed from what was complete and verified when it started.
        assert resumed_from(trial["log"]) == previous["after"]["newest_complete"], where
        after = trial["after"]
        assert after["newest_complete"] is not None and trial["newest_loads"] is True, where
        for name, state in after["checkpoints"].items():
            if state["marked"]:
                assert state["problem"] is None, f"{where}: {name} is marked but {state['problem']}"
        torn += any(not s["marked"] for s in after["checkpoints"].values())
    assert torn >= 2, "no kill landed inside a save: the fault was not injected"


def test_after_the_kills_the_run_ends_bitwise_equal_to_an_uninterrupted_one(saves):
    final = saves["final"]
    assert final["exit"] == 0, final["log"][-3000:]
    assert final["after"]["manifest"] and final["after"]["manifest_problems"] == []
    assert final["after"]["leftovers"] == []
    reference = load_file(Path(saves["reference"]["run_dir"]) / "artifacts/adapter/adapter_model.safetensors")
    got = load_file(Path(final["run_dir"]) / "artifacts/adapter/adapter_model.safetensors")
    assert reference.keys() == got.keys()
    for key in reference:
        assert torch.equal(reference[key], got[key]), f"{key} differs from the uninterrupted run"


@pytest.mark.parametrize("kind, file, says", [
    ("bit-flip", "adapter_model.safetensors", "differs from what was saved (sha256 mismatch: corrupted)"),
    ("truncated", "optimizer.pt", "is truncated or grown"),
    ("missing", "scheduler.pt", "is missing"),
])
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file_and_the_previous_one_resumes(saves, kind, file,
                                                                                               says):
    trial = next(t for t in saves["corruption"] if t["kind"] == kind)
    assert trial["before"]["newest_complete"] == "checkpoint-4"
    # Killed at train begin: the checkpoint (weights, optimizer, scheduler) was loaded, nothing crashed.
    assert trial["killed"], trial["log"][-3000:]
    assert f"checkpoint: skipping checkpoint-4: {file} {says}" in trial["log"]
    assert resumed_from(trial["log"]) == "checkpoint-3"
    assert "train begins at step 3" in trial["log"]
    assert "checkpoint-4" not in trial["after"]["checkpoints"]      # not mixed with the next save


# ---------------------------------------------------------------------------- exports
def test_kills_inside_each_export_never_leave_a_manifest_that_lies(exports):
    trials = exports["trials"]
    assert exports["reference"]["exit"] == 0 and exports["reference"]["after"]["manifest_problems"] == []
    assert {t["stage"] for t in trials} == {"merged", "gguf", "modelfile", "manifest"}
    for trial in trials:
        where = f"export trial {trial['index']} ({trial['stage']}, delay {trial['delay_s']}s)"
        assert trial["killed"], f"{where}: {trial['log'][-2000:]}"
        assert trial["after"]["manifest_problems"] == [], where
        if trial["stage"] != "manifest":   # killed before the manifest could be written
            assert not trial["after"]["manifest"], where
    for trial, rerun in zip(trials, trials[1:]):     # the next export removes what the killed one left
        for left in trial["after"]["leftovers"]:
            assert f"cleanup: removed {left}, left by an interrupted write" in rerun["log"], left
            assert left not in rerun["after"]["leftovers"]
    assert any(t["after"]["leftovers"] for t in trials), "no kill landed inside a staged write"


def test_jobs_export_cleans_up_after_the_kills_and_remakes_exactly_the_reference(exports, saves, hf_cache):
    run = RunDir(Path(saves["final"]["run_dir"]))
    proc = subprocess.run([sys.executable, "jobs/export.py", str(run.root), "--gguf", "q8_0", "--ollama"], cwd=REPO,
                          env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for left in exports["trials"][-1]["after"]["leftovers"]:
        assert f"cleanup: removed {left}" in proc.stdout
    hidden = [p for p in run.root.rglob(".*") if p.name != ".run.lease"]
    assert hidden == [], hidden
    assert not run.lease.exists()
    assert verify_manifest(run) == []
    listed = {e["path"]: e["sha256"] for e in json.loads(run.manifest.read_text())["files"]}
    assert listed == exports["reference"]["sha256"]      # the same adapter gives the same exports, bit for bit


def test_a_damaged_published_artifact_is_reported_and_remade_not_used(exports, saves, hf_cache, capsys):
    from ftlib.cli import export_main     # what jobs/export.py runs, here in this process (it is warm)

    run = RunDir(Path(saves["final"]["run_dir"]))
    gguf = run.gguf / "tiny-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF
    gguf.write_bytes(bytes(data))
    assert verify_manifest(run, deep=False) == []       # status' cheap check: same size
    assert verify_manifest(run) == ["artifacts/gguf/tiny-q8_0.gguf: size or sha256 differs from the manifest (damaged)"]
    assert export_main([str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "export: artifacts/gguf/tiny-q8_0.gguf is missing or differs from the manifest; re-making it" in out
    assert verify_manifest(run) == []
    assert sha256_file(gguf) == exports["reference"]["sha256"]["artifacts/gguf/tiny-q8_0.gguf"]


def test_a_damaged_adapter_stops_jobs_export_with_one_line(saves, capsys):
    from ftlib.cli import export_main

    run = RunDir(Path(saves["final"]["run_dir"]))
    adapter = run.adapter / "adapter_model.safetensors"
    os.truncate(adapter, adapter.stat().st_size - 10)
    assert verify_manifest(run, deep=False) == [
        "artifacts/adapter/adapter_model.safetensors: size or sha256 differs from the manifest (damaged)"]
    assert export_main([str(run.root)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run.root}: artifacts/adapter/adapter_model.safetensors is missing or differs from manifest.json; "
        "it is the trained source of every export and cannot be re-made: restore it or train again"]
