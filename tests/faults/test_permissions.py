"""File modes: results are for sharing (config, manifest, report, adapter, merged model, GGUF,
Modelfile, the token cache, checkpoints follow the user's umask), while nothing ftlib writes is
ever group- or world-writable, even with umask 000; private payloads stay 0600.

Before: mkstemp's 0600 and mkdtemp's 0700 whatever the umask, so teammates on shared storage could
not read a run, and a token cache could not be shared by array tasks of another group member."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env

DRIVER = Path(__file__).resolve().parent / "fault_driver.py"

PRIMITIVES = """
import json, os, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from ftlib import locks, storage

root = Path(sys.argv[1])
run = storage.RunDir(root / "runs" / "tiny").create()
storage.atomic_write_text(run.config, "name: tiny\\n")
storage.atomic_write_bytes(root / "handoff.pkl", b"payload", private=True)
with storage.staging_dir(run.adapter) as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"w")       # written by a library, under the umask
    (tmp / "sub").mkdir()
    (tmp / "sub" / "tool").write_text("#!/bin/sh\\n")
    os.chmod(tmp / "sub" / "tool", 0o777)
ckpt = run.checkpoints / "checkpoint-5"
ckpt.mkdir()                                                     # as the Trainer makes it
(ckpt / "optimizer.pt").write_bytes(b"o")
storage.mark_checkpoint_complete(ckpt, 5)
modes = {}
with locks.file_lock(root / "cache" / ".key.lock"):
    modes["lease"] = os.stat(root / "cache" / ".key.lock").st_mode
for path in [run.root, run.checkpoints, run.artifacts, run.config, root / "handoff.pkl", run.adapter,
             run.adapter / "adapter_model.safetensors", run.adapter / "sub", run.adapter / "sub" / "tool",
             ckpt, ckpt / "optimizer.pt", ckpt / storage.COMPLETE_MARKER, root / "cache"]:
    modes[str(path.relative_to(root))] = os.stat(path).st_mode
print(json.dumps({k: oct(v & 0o777) for k, v in modes.items()}))
"""


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000, 0o027, 0o077])
def test_results_follow_the_umask_and_are_never_group_or_world_writable(umask, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PRIMITIVES, str(tmp_path), oct(umask)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {k: int(v, 8) for k, v in json.loads(proc.stdout).items()}
    file_mode, dir_mode = 0o666 & ~umask & ~0o022, 0o777 & ~umask & ~0o022
    expected = {"runs/tiny": dir_mode, "runs/tiny/checkpoints": dir_mode, "runs/tiny/artifacts": dir_mode,
                "runs/tiny/config.yaml": file_mode, "handoff.pkl": 0o600, "runs/tiny/artifacts/adapter": dir_mode,
                "runs/tiny/artifacts/adapter/adapter_model.safetensors": file_mode,
                "runs/tiny/artifacts/adapter/sub": dir_mode, "runs/tiny/artifacts/adapter/sub/tool": dir_mode,
                "runs/tiny/checkpoints/checkpoint-5": dir_mode,
                "runs/tiny/checkpoints/checkpoint-5/optimizer.pt": file_mode,
                "runs/tiny/checkpoints/checkpoint-5/ftlib_complete.json": file_mode,
                "cache": dir_mode, "lease": file_mode}
    assert {k: oct(v) for k, v in modes.items()} == {k: oct(v) for k, v in expected.items()}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, hf_cache) -> tuple[Path, list[dict]]:
    work = tmp_path_factory.mktemp("permissions")
    root = work / "runs"
    plan = [
        {"command": "submit", "umask": 0o000, "run": str(root / "tiny"), "modes": [str(root / "tiny"), str(root / ".cache")],
         "args": [str(TINY_CONFIG), f"storage.root={root}", f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}",
                  "training.max_steps=4", "training.save_steps=2", "training.eval_strategy=no",
                  "tracking.backends=[wandb,tensorboard]", "export.gguf=[q8_0]", "export.ollama=true", "export.report=true",
                  "--local"]},
        {"command": "export", "umask": 0o027, "run": str(root / "tiny"), "modes": [str(root / "tiny")],
         "args": [str(root / "tiny"), "--force"]},
    ]
    (work / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(DRIVER), "cli-steps", str(work / "out.json"), str(work / "plan.json")],
                          cwd=REPO, env=subprocess_env(hf_cache, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root, json.loads((work / "out.json").read_text())


def test_a_run_trained_under_umask_000_is_readable_by_teammates_and_writable_by_no_one_else(shared_run):
    root, steps = shared_run
    assert steps[0]["exit"] == 0, steps[0]["stderr"][-3000:]
    modes = {k.removeprefix("tiny/").removeprefix("tiny"): v for k, v in steps[0]["modes"].items()}
    assert "train.log" in modes   # console.RunLog creates it with the shared mode too
    # W&B's and TensorBoard's own files too (they were world-writable: the process umask is tightened).
    assert any(k.startswith("wandb/") and k.endswith(".wandb") for k in modes), sorted(modes)
    assert any(k.startswith("tensorboard/") and "tfevents" in k for k in modes), sorted(modes)
    writable = {k: oct(v) for k, v in modes.items() if v & 0o022}
    assert writable == {}, f"group/world-writable: {writable}"
    for name in ["config.yaml", "manifest.json", "report.md", "report.json", "state.json", "provenance.json",
                 "artifacts/adapter/adapter_model.safetensors", "artifacts/merged/config.json",
                 "artifacts/gguf/tiny-q8_0.gguf", "artifacts/Modelfile", "checkpoints/checkpoint-4/optimizer.pt"]:
        assert modes[name] == 0o644, f"{name}: {oct(modes[name])}"
    for name in ["", "artifacts", "artifacts/adapter", "artifacts/merged", "artifacts/gguf", "checkpoints/checkpoint-4"]:
        assert modes[name] == 0o755, f"{name or 'the run directory'}: {oct(modes[name])}"
    cache = [k for k in modes if k.startswith(".cache/data/")]
    assert len(cache) > 3 and all(modes[k] in (0o644, 0o755) for k in cache), {k: oct(modes[k]) for k in cache}


def test_an_export_remade_under_umask_027_follows_that_umask(shared_run):
    root, steps = shared_run
    assert steps[1]["exit"] == 0, steps[1]["stderr"][-3000:]
    modes = {k.removeprefix("tiny/"): v for k, v in steps[1]["modes"].items()}
    for name in ["manifest.json", "artifacts/merged/config.json", "artifacts/gguf/tiny-q8_0.gguf", "artifacts/Modelfile"]:
        assert modes[name] == 0o640, f"{name}: {oct(modes[name])}"
    assert modes["artifacts/merged"] == 0o750
    assert modes["artifacts/adapter/adapter_model.safetensors"] == 0o644    # not re-made by the export
