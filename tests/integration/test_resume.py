"""Resume: a run stopped after a mid-run checkpoint continues to the same weights, same W&B run."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import stop_at
from ftlib.callbacks import StopRequest
from ftlib.recipe import run_recipe
from ftlib.storage import RunDir, newest_complete_checkpoint


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run_dir).adapter / "adapter_model.safetensors")


def test_interrupted_run_resumes_to_identical_adapter_and_one_wandb_run(tiny_config, tmp_path):
    # Evaluation at step 10 comes before the interruption: it must not change training numerics.
    common = ("training.max_steps=30", "training.save_steps=10", "training.eval_steps=10")
    reference = run_recipe(tiny_config(*common, root=tmp_path / "straight"), log=lambda _: None)

    cfg = tiny_config(*common, root=tmp_path / "interrupted")
    stop = StopRequest()
    lines: list[str] = []
    first = run_recipe(cfg, stop=stop, callbacks=[stop_at(stop, 14)], log=lines.append)
    assert first.status == "interrupted" and first.global_step == 15
    run = RunDir(first.run_dir)
    assert newest_complete_checkpoint(run).name == "checkpoint-15"
    assert not run.manifest.exists()
    # A torn checkpoint (no completion marker) is never resumed from.
    (run.checkpoints / "checkpoint-99").mkdir()

    lines.clear()
    second = run_recipe(cfg, log=lines.append)
    assert second.status == "completed" and second.global_step == 30
    assert any("resuming from" in line and "checkpoint-15" in line for line in lines)

    expected, got = _adapter(reference.run_dir), _adapter(second.run_dir)
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"

    assert first.wandb_run_id == second.wandb_run_id
    offline = list((run.root / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(first.wandb_run_id) for p in offline)
    state = json.loads(run.state.read_text())
    assert state["status"] == "completed"


def test_overwrite_output_dir_starts_afresh(tiny_config, tmp_path):
    from ftlib.launch.local import run_local_plan
    from ftlib.plan import prepare_runs

    root = tmp_path / "runs"
    first = run_recipe(tiny_config("training.max_steps=10", root=root), log=lambda _: None)
    old_id = first.wandb_run_id
    cfg = tiny_config("training.max_steps=10", "training.overwrite_output_dir=true", root=root)
    assert run_local_plan(prepare_runs([cfg])) == 0   # what submit --local does
    run = RunDir(first.run_dir)
    assert run.manifest.exists()
    assert (run.root / "wandb_run_id").read_text().strip() != old_id


def test_run_recipe_called_directly_honours_overwrite_output_dir(tiny_config, tmp_path):
    root = tmp_path / "runs"
    first = run_recipe(tiny_config("training.max_steps=5", root=root), log=lambda _: None)
    lines: list[str] = []
    again = run_recipe(tiny_config("training.max_steps=5", "training.overwrite_output_dir=true", root=root),
                       log=lines.append)
    assert again.status == "completed" and again.global_step == 5
    assert again.resumed_from is None and not any("already complete" in line for line in lines)
    assert again.wandb_run_id != first.wandb_run_id
