"""Golden files of the exact sbatch scripts ftlib generates. FTLIB_UPDATE_GOLDEN=1 rewrites them."""
from __future__ import annotations

import difflib
import os
import shlex
import sys

import pytest

from conftest import REPO, TINY_CONFIG
from ftlib.config import load_config
from ftlib.launch.slurm import make_plan, sbatch_script

GOLDEN = REPO / "tests" / "golden" / "sbatch"
CASES = {
    "one_gpu": (REPO / "configs" / "mistral.yaml", ["slurm.partition=gpu", "slurm.account=proj42"]),
    "two_nodes_four_gpus": (REPO / "configs" / "mistral.yaml",
                            ["slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.gpu_type=a100",
                             "slurm.partition=gpu", "slurm.exclusive=true", "slurm.constraint=a100-80g",
                             "slurm.extra_sbatch=[--mail-type=END]", "slurm.setup=[module load cuda/12.4]"]),
    "sweep_array": (TINY_CONFIG, ["sweep={training.learning_rate: [1.0e-3, 1.0e-4, 1.0e-5]}",
                                  "slurm.array_parallelism=2"]),
}


def normalized(text: str) -> str:
    return text.replace(shlex.quote(sys.executable), "<PYTHON>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_script_matches_golden(case):
    config, overrides = CASES[case]
    cfg = load_config(config, ["storage.root=/shared/runs", "storage.hf_cache=/shared/hf",
                               "data.train=/shared/data/train.jsonl", *overrides])
    script = normalized(sbatch_script(make_plan(cfg)))
    path = GOLDEN / f"{case}.sh"
    if os.environ.get("FTLIB_UPDATE_GOLDEN") == "1":
        path.write_text(script)
    expected = path.read_text()
    if script != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), script.splitlines(True),
                                            f"golden/{case}.sh", "generated"))
        pytest.fail(f"sbatch script differs from golden (FTLIB_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_plan_maps_one_task_per_gpu_and_array_elements():
    cfg = load_config(CASES["two_nodes_four_gpus"][0], ["data.train=x.jsonl", *CASES["two_nodes_four_gpus"][1]])
    plan = make_plan(cfg)
    assert plan.parameters["ntasks_per_node"] == 4 and plan.parameters["nodes"] == 2
    assert plan.parameters["gpus_per_node"] == "a100:4"
    sweep = make_plan(load_config(TINY_CONFIG, ["data.train=x.jsonl", *CASES["sweep_array"][1]]))
    assert [c.training["learning_rate"] for c in sweep.configs] == [1e-3, 1e-4, 1e-5]
    assert {c.tracking.group for c in sweep.configs} == {"tiny"}
    assert len({c.run_root for c in sweep.configs}) == 3
