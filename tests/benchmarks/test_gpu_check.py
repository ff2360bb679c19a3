"""benchmarks/gpu_check.py --smoke: the GPU check's own code path on CPU (tiny shapes, fp32), run
for real in a subprocess, with wandb/deepspeed/submitit/gguf hidden as on the GPU machine. Checks
the fields of gpu-check.json and the parts of gpu-check.md, and that a part past its deadline is
cut and recorded while the files are still written. Not a timed test: no speed is asserted."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow     # ~2-3 minutes on a shared 2-core CPU, most of it imports

CHECK = REPO / "benchmarks" / "gpu_check.py"
PARTS = ["environment", "correctness", "benchmark", "preflight", "speed_options"]


def _run(tmp_path, hf_cache, name: str, *extra: str, timeout: float = 900):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(CHECK), "--smoke", "--out", str(out), "--work-dir",
                           str(tmp_path / f"{name}-work"), *extra],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=timeout)
    return proc, out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, hf_cache):
    tmp = tmp_path_factory.mktemp("gpu-check")
    proc, out = _run(tmp, hf_cache, "full")
    assert (out / "gpu-check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text()


def test_smoke_runs_every_part_and_writes_json_then_markdown(smoke):
    proc, report, md = smoke
    parts = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == PARTS
    assert {n: p["status"] for n, p in parts.items()} == {n: "ok" for n in PARTS}, \
        {n: (p["status"], p["note"], p.get("error", "")[-800:]) for n, p in parts.items()}
    assert proc.returncode == 0
    assert report["mode"] == "smoke" and report["schema"] == 1
    assert set(report["hidden_modules"]) == {"wandb", "deepspeed", "submitit", "gguf"}
    for p in report["parts"]:
        assert _finite(p["seconds"]) and p["seconds"] <= p["deadline_s"] + 15
    assert report["summary"]["statuses"] == {n: "ok" for n in PARTS}
    for name in PARTS:
        assert f"| {name} | **ok** |" in md
    for heading in ("## environment", "## correctness", "## benchmark", "## preflight", "## speed options"):
        assert heading in md


def test_environment_records_versions_and_the_hidden_packages(smoke):
    env = next(p for p in smoke[1]["parts"] if p["name"] == "environment")["result"]
    for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "omegaconf"):
        assert env["versions"][name], name
    assert "missing" in env and "gpu" in env and env["cuda_available"] is False
    # The check ran with these hidden, as the GPU machine lacks them: ftlib must not need them.
    assert env["not_needed_importable"] == {"wandb": False, "deepspeed": False, "submitit": False, "gguf": False}


def test_correctness_trains_reloads_and_merges(smoke):
    c = next(p for p in smoke[1]["parts"] if p["name"] == "correctness")["result"]
    assert all(c["checks"].values()), c["checks"]
    assert c["loss_last"] < c["loss_first"] and c["linear4bit_layers"] > 0
    for key in ("adapter_reload", "merge"):
        assert _finite(c[key]["max_abs_diff"]) and c[key]["max_abs_diff"] <= c[key]["tolerance"]
    g = c["gpu_tests"]
    assert g["status"] == "ran" and g["files"] and g["failed"] == g["errors"] == 0
    assert g["skipped"] >= 1          # no CUDA here: the gpu tests skip, and are counted


def test_benchmark_arm_fields(smoke):
    b = next(p for p in smoke[1]["parts"] if p["name"] == "benchmark")["result"]
    assert all(b["fairness_checks"].values()), b["fairness_checks"]
    assert b["model_shape"]["layers"] >= 1 and b["lora"]["r"] == 16 and b["gradient_checkpointing"]
    assert b["quantization"]["bnb_4bit_quant_type"] == "nf4" and b["quantization"]["bnb_4bit_use_double_quant"]
    for arm in ("baseline", "ftlib"):
        for key in ("useful_tokens_per_s", "total_tokens_per_s", "median_step_seconds", "mfu",
                    "peak_memory_absolute_bytes"):
            assert _finite(b[arm][key]) and b[arm][key] > 0, (arm, key, b[arm][key])
    assert b["baseline"]["useful_tokens"] == b["ftlib"]["useful_tokens"]
    assert b["ratios"]["useful_tokens_per_s"] == pytest.approx(
        b["ftlib"]["useful_tokens_per_s"] / b["baseline"]["useful_tokens_per_s"])
    assert _finite(b["peak_flops"]) and "4 N_base" in b["mfu_formula"]


def test_preflight_compares_four_configurations(smoke):
    pre = next(p for p in smoke[1]["parts"] if p["name"] == "preflight")["result"]
    configs = {(c["micro_batch"], c["gradient_checkpointing"]): c for c in pre["configs"]}
    assert set(configs) == {(1, True), (4, True), (1, False), (4, False)}
    for c in configs.values():
        assert c["status"] == "ok", c
        assert c["estimate_bytes"] > 0 and c["measured_bytes"] > 0 and _finite(c["error"])
    # More micro-batch, more memory, in the estimate.
    assert configs[(4, False)]["estimate_bytes"] > configs[(1, False)]["estimate_bytes"]
    assert pre["target_error"] == 0.15


def test_speed_options_are_each_measured_or_recorded(smoke):
    sp = next(p for p in smoke[1]["parts"] if p["name"] == "speed_options")["result"]
    assert list(sp["options"]) == ["sdpa", "eager", "flex_attention", "liger", "compile_lora"]
    for name, o in sp["options"].items():
        assert o["status"] in ("ok", "failed", "skipped"), (name, o)
        if o["status"] == "ok":
            assert _finite(o["tokens_per_s"]) and _finite(o["first_loss"]) and _finite(o["speedup_vs_sdpa"])
        else:
            assert o.get("reason") or o.get("error")
    assert sp["options"]["sdpa"]["status"] == "ok" and sp["options"]["eager"]["status"] == "ok"
    # The same adapter and batch for every option: the first losses agree (masking of packed rows).
    assert sp["options"]["eager"]["loss_agrees"]
    assert sp["winner"] in sp["options"] and sp["options"][sp["winner"]]["status"] == "ok"


def test_a_part_past_its_deadline_is_cut_and_recorded(tmp_path, hf_cache):
    proc, out = _run(tmp_path, hf_cache, "cut", "--parts", "environment,correctness", "--deadline-scale", "0.01",
                     timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    status = {p["name"]: p for p in report["parts"]}
    assert status["environment"]["status"] == "cut" and status["correctness"]["status"] == "cut"
    assert "deadline" in status["environment"]["note"]
    assert status["environment"]["seconds"] < 15           # stopped, not waited for
    assert {status[n]["status"] for n in ("benchmark", "preflight", "speed_options")} == {"skipped"}
    md = (out / "gpu-check.md").read_text()
    assert "| environment | **cut** |" in md and "| benchmark | **skipped** |" in md
