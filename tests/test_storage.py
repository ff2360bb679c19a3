"""ftlib/storage.py on real files: checkpoint markers that catch damage, rotation only after the
new checkpoint is complete, leftovers of killed writers, the manifest check status uses, DiskFull."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ftlib import storage
from ftlib.storage import RunDir


def checkpoint(run: RunDir, step: int, *, marked: bool = True) -> Path:
    """A checkpoint-N with the files a Trainer writes (contents differ per step)."""
    path = run.checkpoints / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40 + bytes([step]))
    (path / "optimizer.pt").write_bytes(b"\x80\x02" + bytes([step]) * 3000)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        storage.mark_checkpoint_complete(path, step)
    return path


def flip_byte(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip": (lambda p: flip_byte(p / "adapter_model.safetensors"),
                 "adapter_model.safetensors differs from what was saved (sha256 mismatch: corrupted)"),
    "truncation": (lambda p: os.truncate(p / "optimizer.pt", 100),
                   "optimizer.pt is truncated or grown (100 bytes, 3002 saved)"),
    "missing file": (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "no marker": (lambda p: (p / storage.COMPLETE_MARKER).unlink(),
                  "no completeness marker (the save was interrupted)"),
    "torn marker": (lambda p: (p / storage.COMPLETE_MARKER).write_text('{"step": 2, "fi'),
                    "its completeness marker is unreadable (JSONDecodeError)"),
}


def test_the_marker_records_every_file_with_size_and_sha256(tmp_path):
    run = RunDir(tmp_path / "run")
    path = checkpoint(run, 5)
    marker = json.loads((path / storage.COMPLETE_MARKER).read_text())
    assert marker["step"] == 5
    assert [f["path"] for f in marker["files"]] == ["adapter_model.safetensors", "optimizer.pt",
                                                    "trainer_state.json"]
    assert marker["files"][1] == {"path": "optimizer.pt", "size": 3002,
                                  "sha256": storage.sha256_file(path / "optimizer.pt")}
    assert marker["bytes"] == sum(f["size"] for f in marker["files"])
    assert storage.checkpoint_problem(path) is None


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_passed_over_naming_the_file(kind, tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint(run, 2)
    newest = checkpoint(run, 4)
    damage, reason = DAMAGE[kind]
    damage(newest)
    lines: list[str] = []
    assert storage.newest_complete_checkpoint(run, log=lines.append) == run.checkpoints / "checkpoint-2"
    assert lines == [f"checkpoint: skipping checkpoint-4: {reason}; trying the previous checkpoint"]


def test_no_verifiable_checkpoint_means_none(tmp_path):
    run = RunDir(tmp_path / "run")
    assert storage.newest_complete_checkpoint(run) is None          # no checkpoints folder at all
    flip_byte(checkpoint(run, 3) / "optimizer.pt", 10)
    lines: list[str] = []
    assert storage.newest_complete_checkpoint(run, log=lines.append) is None
    assert len(lines) == 1 and "checkpoint-3: optimizer.pt differs" in lines[0]


def test_a_marker_of_an_older_ftlib_without_checksums_still_counts(tmp_path):
    run = RunDir(tmp_path / "run")
    path = checkpoint(run, 7, marked=False)
    (path / storage.COMPLETE_MARKER).write_text(json.dumps({"step": 7, "time": 0}))
    assert storage.newest_complete_checkpoint(run) == path


def test_rotation_keeps_the_newest_complete_ones_and_drops_torn_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        checkpoint(run, step)
    checkpoint(run, 4, marked=False)       # torn: a save that was killed, then redone further on
    checkpoint(run, 5)
    deleted = storage.prune_checkpoints(run, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    assert [p.name for p in storage.checkpoints_newest_first(run)] == ["checkpoint-5", "checkpoint-3"]
    assert not list(run.checkpoints.glob(".*"))


def test_rotation_never_deletes_before_a_new_checkpoint_is_complete(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint(run, 5)
    checkpoint(run, 10, marked=False)      # being saved (or killed before its marker)
    assert storage.prune_checkpoints(run, keep=1) == []
    assert storage.newest_complete_checkpoint(run).name == "checkpoint-5"


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        checkpoint(run, step)
    storage.prune_checkpoints(run, keep=1, protect=str(run.checkpoints / "checkpoint-1"))
    assert [p.name for p in storage.checkpoints_newest_first(run)] == ["checkpoint-3", "checkpoint-1"]


def test_checkpoints_past_the_resume_point_are_discarded_with_the_reason(tmp_path):
    run = RunDir(tmp_path / "run")
    checkpoint(run, 2)
    flip_byte(checkpoint(run, 4) / "adapter_model.safetensors")
    checkpoint(run, 6, marked=False)
    lines: list[str] = []
    storage.discard_checkpoints_after(run, 2, log=lines.append)
    assert [p.name for p in storage.checkpoints_newest_first(run)] == ["checkpoint-2"]
    assert lines == ["checkpoint: removing checkpoint-6 (no completeness marker (the save was interrupted))",
                     "checkpoint: removing checkpoint-4 (adapter_model.safetensors differs from what was saved "
                     "(sha256 mismatch: corrupted))"]


def test_leftovers_of_killed_writers_are_removed_and_an_interrupted_replace_is_undone(tmp_path):
    run = RunDir(tmp_path / "run").create()
    (run.artifacts / ".adapter.k3j4h5g6.tmp").mkdir()                 # staging folder of a killed save
    (run.artifacts / ".adapter.k3j4h5g6.tmp" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (run.artifacts / ".merged.old").mkdir()                           # killed between the two renames
    (run.artifacts / ".merged.old" / "config.json").write_text("{}")
    run.gguf.mkdir()
    (run.gguf / ".tiny-q8_0.gguf.q8_0.abcd1234.tmp").write_bytes(b"GGUF")
    (run.root / ".manifest.json.zz9y8x7w.tmp").write_text("{")
    (run.checkpoints / ".checkpoint-3.deleting").mkdir()
    (run.checkpoints / "checkpoint-5").mkdir()
    (run.checkpoints / "checkpoint-5" / ".ftlib_complete.json.q1w2e3r4.tmp").write_text("{")
    taking = run.root / f".{run.lease.name}.0123abcd.tmp"             # someone taking the lease now: not ours
    taking.write_text("{}")
    lines: list[str] = []
    storage.clean_leftovers(run, log=lines.append)
    assert (run.merged / "config.json").read_text() == "{}"           # the previous complete version is back
    left = sorted(str(p.relative_to(run.root)) for p in run.root.rglob("*"))
    assert left == sorted(["artifacts", "artifacts/gguf", "artifacts/merged", "artifacts/merged/config.json",
                           "checkpoints", "checkpoints/checkpoint-5", taking.name])
    assert "cleanup: removed artifacts/.adapter.k3j4h5g6.tmp, left by an interrupted write" in lines
    assert any("restored" in line and "merged" in line for line in lines)


def test_staging_dir_replaces_only_on_success_and_cleans_a_killed_writers_staging(tmp_path):
    final = tmp_path / "artifacts" / "merged"
    with storage.staging_dir(final) as tmp:
        (tmp / "config.json").write_text("one")
    (tmp_path / "artifacts" / ".merged.deadbeef.tmp").mkdir()         # a killed earlier writer
    with pytest.raises(RuntimeError):
        with storage.staging_dir(final) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("the save failed")
    assert (final / "config.json").read_text() == "one"
    assert sorted(p.name for p in final.parent.iterdir()) == ["merged"]


def test_verify_manifest_cheap_for_status_and_deep_for_exports(tmp_path):
    run = RunDir(tmp_path / "run").create()
    (run.artifacts / "adapter").mkdir()
    (run.adapter / "adapter_model.safetensors").write_bytes(b"a" * 1000)
    (run.artifacts / "Modelfile").write_text("FROM ./gguf/x.gguf\n")
    storage.write_manifest(run)
    assert storage.verify_manifest(run) == [] and storage.verify_manifest(run, deep=False) == []
    flip_byte(run.adapter / "adapter_model.safetensors", 500)
    assert storage.verify_manifest(run, deep=False) == []     # same size: only the hash can tell
    assert storage.verify_manifest(run) == [
        "artifacts/adapter/adapter_model.safetensors: size or sha256 differs from the manifest (damaged)"]
    os.truncate(run.adapter / "adapter_model.safetensors", 10)
    (run.artifacts / "Modelfile").unlink()
    assert storage.verify_manifest(run, deep=False) == [
        "artifacts/Modelfile: missing",
        "artifacts/adapter/adapter_model.safetensors: size or sha256 differs from the manifest (damaged)"]
    run.manifest.write_text('{"run": "x", "fil')
    assert storage.verify_manifest(run) == [f"{run.manifest} is unreadable (damaged)"]
    run.manifest.unlink()
    assert storage.verify_manifest(run) == [f"{run.manifest} is missing"]


def test_disk_full_is_recognised_and_says_the_path_and_the_room(tmp_path):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    full = storage.as_disk_full(enospc, tmp_path / "x", 3 * 1024 * 1024)
    assert isinstance(full, storage.DiskFull) and isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert str(full).startswith(f"disk full writing {tmp_path / 'x'}: ")
    assert "about 3.0 MiB is needed" in str(full) and "free on its filesystem" in str(full)
    wrapped = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(storage.as_disk_full(wrapped, tmp_path, None), storage.DiskFull)
    # An ordinary error on a disk with room is left as it is.
    assert storage.as_disk_full(ValueError("shape mismatch"), tmp_path, 10) is None
    assert storage.as_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path, 10) is None
    with pytest.raises(storage.DiskFull) as caught:
        with storage.disk_full_guard(tmp_path / "y", 5):
            raise enospc
    assert caught.value.__cause__ is enospc
