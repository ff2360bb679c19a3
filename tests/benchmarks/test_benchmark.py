"""benchmarks/bench_training.py in --short mode: both arms run for real (4-bit QLoRA on CPU) and
the comparison is fair by construction. Not a timed test: nothing here asserts a speed."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

BENCH = REPO / "benchmarks" / "bench_training.py"
sys.path.insert(0, str(BENCH.parent))


def test_choose_sizes_gives_both_arms_the_same_steps_and_examples():
    from fairness import choose_sizes
    from ftlib.data import pack

    lengths = [(37 * i) % 500 + 12 for i in range(400)]
    for steps, batch in ((4, 4), (30, 8), (20, 8), (7, 3)):
        sizes = choose_sizes(lengths, steps, batch, 512)
        n, b_base, b_pack = sizes["examples"], sizes["baseline_batch"], sizes["ftlib_batch"]
        rows = pack([{"input_ids": [1] * m, "labels": [1] * m} for m in lengths[:n]], 512)
        assert len(rows) == sizes["packed_rows"]
        assert math.ceil(n / b_base) == steps == math.ceil(len(rows) / b_pack)


def test_choose_sizes_refuses_a_pool_that_is_too_small():
    from fairness import choose_sizes
    with pytest.raises(ValueError, match="exactly 5 steps"):
        choose_sizes([500, 500, 500], 5, 4, 512)


def test_short_benchmark_runs_both_arms_on_the_same_examples(tmp_path, hf_cache):
    out_md, out_json = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--short", "--out", str(out_md), "--json", str(out_json),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    plan, cmp, results = report["plan"], report["comparison"], report["results"]
    base, ftlib = cmp["baseline"], cmp["ftlib"]

    # The fair definition: the same examples, each exactly once, in the same number of steps,
    # hence the same response (loss-bearing in ftlib's sense) tokens.
    assert all(cmp["checks"].values()), cmp["checks"]
    assert results["baseline"]["exactly_once"] and results["ftlib"]["exactly_once"]
    assert base["examples"] == ftlib["examples"] == plan["sizes"]["examples"] > 0
    assert base["useful_tokens"] == ftlib["useful_tokens"] == sum(plan["example_response_tokens"]) > 0
    assert base["steps"] == ftlib["steps"] == plan["sizes"]["steps"]
    assert results["ftlib"]["ftlib_train_samples"] == plan["sizes"]["examples"]
    assert results["ftlib"]["dataset_rows"] == plan["sizes"]["packed_rows"]
    # ftlib's loss falls on the responses alone; the guide recipe's on prompts too.
    assert ftlib["loss_tokens"] == ftlib["useful_tokens"] < base["loss_tokens"]
    # The guide recipe pads every example to max_length.
    assert base["total_tokens"] == plan["sizes"]["examples"] * plan["max_length"]
    assert base["padding_fraction"] > ftlib["padding_fraction"] >= 0

    for arm in (base, ftlib):
        for key in ("train_seconds", "useful_tokens_per_s", "total_tokens_per_s", "useful_tokens_per_cpu_s",
                    "heldout_loss_before", "heldout_loss_after"):
            assert arm[key] > 0 and math.isfinite(arm[key]), (key, arm[key])
        assert arm["peak_memory_absolute_bytes"] > 0 and arm["peak_memory_bytes"] >= 0
        assert arm["useful_tokens_per_s"] == pytest.approx(arm["useful_tokens"] / arm["train_seconds"])
        assert arm["heldout_loss_after"] < arm["heldout_loss_before"]     # both learned something
    assert base["heldout_loss_before"] == pytest.approx(ftlib["heldout_loss_before"], abs=1e-3)

    ratio = cmp["ratios"]
    assert ratio["useful_tokens_per_s"] == pytest.approx(ftlib["useful_tokens_per_s"] / base["useful_tokens_per_s"])
    assert ratio["total_tokens_per_s"] == pytest.approx(ftlib["total_tokens_per_s"] / base["total_tokens_per_s"])
    assert ratio["heldout_loss_after"] == pytest.approx(ftlib["heldout_loss_after"] / base["heldout_loss_after"])
    assert cmp["target"]["met"] == (ratio["useful_tokens_per_s"] >= 2.0 and cmp["target"]["heldout_loss_no_worse"])

    md = out_md.read_text()
    assert "| **useful tokens/s** |" in md and f"{ratio['useful_tokens_per_s']:.2f}x" in md
    assert "- CPU: " in md and "--short" in md                               # machine and exact command recorded


def test_gpu_mode_skips_with_a_message_without_cuda(tmp_path, hf_cache):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --gpu would run the 7B benchmark")
    proc = subprocess.run([sys.executable, str(BENCH), "--gpu", "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA is not available" in proc.stdout


def test_half_padded_draw_pads_about_half_at_512_and_both_arms_get_equal_steps(tiny_config):
    import bench_data
    from fairness import choose_examples
    from ftlib.data import pack, to_sample, tokenize_sample
    from ftlib.model import load_tokenizer, resolve_model_path

    cfg = tiny_config("data.max_length=512")
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    lengths = {}
    for draw in ("long-tailed", "half-padded"):
        rows = bench_data.make_rows(400, seed=0, draw=draw)
        lengths[draw] = [len(tokenize_sample(tokenizer, to_sample(r, cfg.data), cfg.data)["input_ids"]) for r in rows]
    padding = {d: 1 - sum(v) / (512 * len(v)) for d, v in lengths.items()}
    assert 0.4 < padding["half-padded"] < 0.6 and padding["long-tailed"] > 0.7, padding
    # The default draw is unchanged by the draw parameter (same rows as before it existed).
    assert bench_data.make_rows(5, seed=0) == bench_data.make_rows(5, seed=0, draw="long-tailed")
    chosen, sizes = choose_examples(lengths["half-padded"], 20, 8, 512)
    rows = pack([{"input_ids": [1] * lengths["half-padded"][i], "labels": [1] * lengths["half-padded"][i]}
                 for i in chosen], 512)
    assert len(rows) == sizes["packed_rows"]
    assert math.ceil(len(chosen) / sizes["baseline_batch"]) == 20 == math.ceil(len(rows) / sizes["ftlib_batch"])
