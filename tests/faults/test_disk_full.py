"""A full disk: storage.root on a small tmpfs mounted by the test (root only). The disk is filled at
a named point (after checkpoint-4 is marked; before the merged export) by tests/faults/fault_driver.py,
which runs the real CLI entry points (submit --local, export) in forked children.

What must hold: ONE error line naming the path, the free and the needed room, exit status 2, no
traceback on the terminal; the last complete checkpoint survives and training resumes from it once
there is room; a failed export leaves no staging folder; preflight's room check warns before
submission."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env
from ftlib.config import load_config
from ftlib.plan import room_warning, space_needed
from ftlib.storage import RunDir, verify_manifest

DRIVER = Path(__file__).resolve().parent / "fault_driver.py"
SIZE = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    mount = tmp_path_factory.mktemp("small-disk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", f"ftlib-test-{uuid.uuid4().hex[:6]}",
                           str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def steps(small_disk, hf_cache, tmp_path_factory) -> list[dict]:
    run = small_disk / "tiny"
    train = ["submit", [str(TINY_CONFIG), f"storage.root={small_disk}", f"storage.hf_cache={hf_cache}",
                        f"data.train={SAMPLE_DATA}", "training.max_steps=8", "training.save_steps=4",
                        "training.save_total_limit=1", "training.eval_strategy=no", "export.merged=false",
                        "export.report=false", "tracking.backends=[none]", "--local"]]
    plan = [
        # 0: the disk fills up after checkpoint-4 is complete: checkpoint-8 cannot be written
        {"command": train[0], "args": train[1], "mount": str(small_disk), "run": str(run),
         "fill_after_marker": 4, "leave": 40 * 1024},
        # 1: room again: the same command resumes from checkpoint-4 and finishes
        {"command": train[0], "args": train[1], "mount": str(small_disk), "run": str(run), "unfill": True},
        # 2: the merged export (about 600 KiB) meets a disk with 150 KiB left
        {"command": "export", "args": [str(run), "--gguf", "q8_0"], "mount": str(small_disk), "run": str(run),
         "fill_before_merged": True, "leave": 150 * 1024},
        # 3: room again: the export is made
        {"command": "export", "args": [str(run), "--gguf", "q8_0"], "mount": str(small_disk), "run": str(run),
         "unfill": True},
    ]
    work = tmp_path_factory.mktemp("disk-full-driver")
    (work / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(DRIVER), "cli-steps", str(work / "out.json"), str(work / "plan.json")],
                          cwd=REPO, env=subprocess_env(hf_cache, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((work / "out.json").read_text())


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_it_and_the_room(steps, small_disk):
    full = steps[0]
    assert full["exit"] == 2, full["stderr"][-3000:]
    lines = error_lines(full["stderr"])
    assert len(lines) == 1, full["stderr"][-3000:]
    line = lines[0]
    assert line.startswith(f"error: disk full writing {small_disk / 'tiny' / 'checkpoints' / 'checkpoint-8'}: ")
    assert " KiB free on its filesystem, about " in line and " KiB is needed;" in line
    assert line.endswith("; training resumes from checkpoint-4"), line
    assert "Traceback" not in full["stderr"]


def test_the_last_good_checkpoint_survives_the_full_disk_and_training_resumes_from_it(steps):
    after = steps[0]["after"]
    assert after["newest_complete"] == "checkpoint-4"
    assert after["checkpoints"] == {"checkpoint-4": {"marked": True, "problem": None}}   # the torn one is gone
    resumed = steps[1]
    assert resumed["exit"] == 0, resumed["stderr"][-3000:]
    assert "resuming from" in resumed["stdout"] and "checkpoint-4 (step 4)" in resumed["stdout"]
    assert resumed["after"]["manifest"] and resumed["after"]["manifest_problems"] == []


def test_an_export_that_does_not_fit_is_one_line_and_leaves_no_staging(steps, small_disk):
    full = steps[2]
    assert full["exit"] == 2, full["stderr"][-3000:]
    lines = error_lines(full["stderr"])
    assert len(lines) == 1 and "Traceback" not in full["stderr"], full["stderr"][-3000:]
    assert lines[0].startswith(f"error: disk full writing {small_disk / 'tiny' / 'artifacts' / 'merged'}: ")
    assert " KiB free on its filesystem, about " in lines[0]
    assert full["after"]["leftovers"] == []
    made = steps[3]
    assert made["exit"] == 0, made["stderr"][-3000:]
    run = RunDir(small_disk / "tiny")
    assert verify_manifest(run) == []
    assert (run.gguf / "tiny-q8_0.gguf").is_file()


def test_preflight_room_check_warns_when_storage_root_is_too_small(small_disk, tmp_path):
    cfg = load_config(TINY_CONFIG, [f"storage.root={small_disk}", f"data.train={SAMPLE_DATA}", "export.gguf=[f16]"])
    need = space_needed(cfg, n_params=2_000_000_000, n_trainable=10_000_000)
    assert need["total"] == need["checkpoints"] + need["adapter"] + need["merged"] + need["gguf"]
    assert need["gguf"] == 4_000_000_000 and need["adapter"] == 40_000_000
    warning = room_warning(cfg, n_params=2_000_000_000, n_trainable=10_000_000)
    assert warning.startswith(f"warning: storage.root {small_disk} has ") and "run tiny writes about" in warning
    assert "would stop with 'disk full'" in warning
    roomy = load_config(TINY_CONFIG, [f"storage.root={tmp_path}", f"data.train={SAMPLE_DATA}"])
    assert room_warning(roomy, n_params=120_000, n_trainable=16_384) is None
