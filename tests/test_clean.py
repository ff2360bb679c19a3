"""jobs/clean.py: checkpoints of finished runs go, exactly as --dry-run lists them; artifacts, the
report, the final checkpoint and every unfinished run stay as they were. The run directories are
made with ftlib's own storage functions (checkpoint marker, manifest, state), as a job makes them."""
from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from ftlib.clean import plan_clean
from ftlib.storage import RunDir, human, mark_checkpoint_complete, update_state, verify_manifest, write_manifest

SEED = 1234


def make_run(root: Path, name: str, *, status: str | None, manifest: bool, steps=(5, 10, 15),
             complete=(5, 10, 15), rng: random.Random) -> RunDir:
    run = RunDir(root / name).create()
    run.config.write_text(f"name: {name}\n")
    for step in steps:
        ckpt = run.checkpoints / f"checkpoint-{step}"
        (ckpt / "sub").mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(rng.randbytes(rng.randint(1000, 5000)))
        (ckpt / "sub" / "optimizer.pt").write_bytes(rng.randbytes(rng.randint(1000, 5000)))
        if step in complete:
            mark_checkpoint_complete(ckpt, step)
    (run.adapter).mkdir(parents=True)
    (run.adapter / "adapter_model.safetensors").write_bytes(rng.randbytes(2048))
    (run.root / "report.md").write_text("# report\n")
    if manifest:
        write_manifest(run)
    if status:
        update_state(run, status=status, step=max(steps))
    return run


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def runs(tmp_path):
    rng = random.Random(SEED)
    print(f"clean test data seed {SEED}")
    root = tmp_path / "runs"
    made = {
        "done": make_run(root, "done", status="completed", manifest=True, rng=rng),
        # an interrupted clean's leftover and a newer checkpoint the Trainer never finished
        "done-messy": make_run(root, "done-messy", status="completed", manifest=True, steps=(5, 10, 20),
                               complete=(5, 10), rng=rng),
        "running": make_run(root, "running", status="running", manifest=False, rng=rng),
        "queued-again": make_run(root, "queued-again", status="submitted", manifest=True, rng=rng),
        "interrupted": make_run(root, "interrupted", status="interrupted", manifest=False, rng=rng),
        "tampered": make_run(root, "tampered", status="completed", manifest=True, rng=rng),
    }
    leftover = made["done-messy"].checkpoints / ".checkpoint-1.deleting"
    leftover.mkdir()
    (leftover / "x").write_bytes(b"x" * 100)
    (made["tampered"].adapter / "adapter_model.safetensors").write_bytes(b"changed")
    return root, made


def clean(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/clean.py", "--root", str(root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def listed(output: str, verb: str) -> dict[str, str]:
    return dict(re.findall(rf": {verb} (\S+) \(([^)]+)\)$", output, flags=re.M))


def test_dry_run_lists_exactly_what_clean_removes_and_nothing_else_changes(runs):
    root, made = runs
    before = {name: tree_digest(run.root) for name, run in made.items()}
    dry = clean(root, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {name: tree_digest(run.root) for name, run in made.items()} == before   # dry: nothing touched
    planned = listed(dry.stdout, "would remove")
    done, messy = made["done"].checkpoints, made["done-messy"].checkpoints
    assert set(planned) == {str(done / "checkpoint-5"), str(done / "checkpoint-10"),
                            str(messy / ".checkpoint-1.deleting"), str(messy / "checkpoint-5"),
                            str(messy / "checkpoint-20")}
    assert re.search(r"^would free .* \(5 path\(s\)\)$", dry.stdout, flags=re.M)

    real = clean(root)
    assert real.returncode == 0, real.stderr
    assert listed(real.stdout, "removed") == planned
    assert not any(Path(path).exists() for path in planned)
    after = {name: tree_digest(run.root) for name, run in made.items()}
    for name in ("done", "done-messy"):
        gone = [path for path in before[name] if path not in after[name]]
        # every file that went was inside a planned checkpoint directory, and nothing else changed
        assert {str(made[name].root / "/".join(path.split("/")[:2])) for path in gone} <= set(planned)
        assert {path: after[name][path] for path in after[name]} == \
            {path: before[name][path] for path in before[name] if path not in gone}
        assert verify_manifest(made[name]) == []          # artifacts intact
        assert (made[name].root / "report.md").exists()
    assert sorted(p.name for p in done.iterdir()) == ["checkpoint-15"]     # the final checkpoint stays
    assert sorted(p.name for p in messy.iterdir()) == ["checkpoint-10"]    # newest *complete* one
    for name in ("running", "queued-again", "interrupted", "tampered"):
        assert after[name] == before[name], f"{name} was touched"
    reasons = dict(re.findall(r"^(\S+): untouched: (.*)$", real.stdout, flags=re.M))
    assert reasons["running"] == "not finished (no manifest.json)"
    assert reasons["queued-again"] == "not finished (state.json status: submitted)"
    assert reasons["tampered"].startswith("artifacts do not verify against manifest.json")

    again = clean(root, "--dry-run")
    assert "done: nothing to remove; keeps the final checkpoint checkpoint-15" in again.stdout
    assert listed(again.stdout, "would remove") == {}


def test_sizes_reported_are_the_bytes_on_disk(runs):
    root, made = runs
    plan = plan_clean(made["done"])
    on_disk = {str(r.path): sum(p.stat().st_size for p in r.path.rglob("*") if p.is_file()) for r in plan.removals}
    assert {str(r.path): r.size for r in plan.removals} == on_disk
    dry = clean(root, "--dry-run", "done")
    total = sum(on_disk.values())
    assert f"would free {human(total)} (2 path(s))" in dry.stdout


def test_all_checkpoints_removes_the_final_one_too(runs):
    root, made = runs
    other = tree_digest(made["done-messy"].root)
    proc = clean(root, "--all-checkpoints", "done")
    assert proc.returncode == 0, proc.stderr
    assert list(made["done"].checkpoints.iterdir()) == []
    assert verify_manifest(made["done"]) == []
    assert tree_digest(made["done-messy"].root) == other     # a run not named is not touched


def test_an_unknown_run_is_one_line_exit_2(runs):
    root, _ = runs
    proc = clean(root, "nosuchrun")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: no run named 'nosuchrun' under {root} (runs: done, done-messy, interrupted, queued-again, "
        "running, tampered); pass --root or --config"]


def test_a_run_whose_lease_a_live_job_holds_is_untouched(runs):
    from ftlib.locks import run_lease
    root, made = runs
    before = tree_digest(made["done"].root)
    with run_lease(made["done"], "training"):          # this test process plays the live job
        for args in (("--dry-run",), ()):
            proc = clean(root, *args, "done")
            assert proc.returncode == 0, proc.stderr
            line = next(line for line in proc.stdout.splitlines() if line.startswith("done: "))
            assert line.startswith("done: untouched: ") and "in use by" in line and "training" in line
    assert tree_digest(made["done"].root) == before
