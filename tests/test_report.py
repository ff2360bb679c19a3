"""The run report (ftlib/report.py) and the export CLI (jobs/export.py) on one tiny run."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_DATA, TINY_CONFIG, subprocess_env
from ftlib.storage import RunDir, sha256_file, verify_manifest, write_manifest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, hf_cache):
    """A finished 10-step tiny QLoRA run with a held-out split (adapter + merged model)."""
    from ftlib.config import load_config
    from ftlib.recipe import run_recipe

    root = tmp_path_factory.mktemp("report")
    cfg = load_config(TINY_CONFIG, [f"storage.root={root / 'runs'}", f"storage.hf_cache={hf_cache}",
                                    f"data.train={SAMPLE_DATA}", "training.max_steps=10",
                                    "training.logging_steps=2", "tracking.backends=[none]"])
    result = run_recipe(cfg, log=lambda _: None)
    assert result.status == "completed" and result.eval_loss is not None
    return cfg, RunDir(result.run_dir), result.eval_loss


def _export(run: RunDir, hf_cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/export.py", str(run.root), *args], cwd=REPO,
                          env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)


def _artifact_hashes(run: RunDir) -> dict[str, str]:
    return {str(p.relative_to(run.root)): sha256_file(p) for p in sorted(run.artifacts.rglob("*")) if p.is_file()}


def test_report_compares_base_and_fine_tuned_on_held_out_data(tiny_run):
    from ftlib.report import write_report

    cfg, run, trainer_eval_loss = tiny_run
    returned = write_report(cfg, run.root, n_prompts=3, max_new_tokens=12, log=lambda _: None)
    report = json.loads((run.root / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))

    base, tuned = report["base"], report["fine_tuned"]
    assert tuned["loss"] < base["loss"] - 0.5, (base, tuned)
    for metrics in (base, tuned):
        assert abs(metrics["perplexity"] - math.exp(metrics["loss"])) < 1e-6
        assert metrics["tokens"] > 0
    assert base["tokens"] == tuned["tokens"]
    # Response tokens only, summed over the eval split: with one eval batch this is what the
    # Trainer's own evaluation reported for the trained model.
    assert tuned["loss"] == pytest.approx(trainer_eval_loss, abs=1e-3)

    assert len(report["samples"]) == 3
    for sample in report["samples"]:
        assert sample["prompt"] and sample["reference"]
        assert isinstance(sample["base"], str) and isinstance(sample["fine_tuned"], str)
    assert report["generation"]["greedy"] is True and report["generation"]["n_prompts"] == 3
    assert report["eval"]["samples"] >= 3
    assert [step for step, _ in report["loss_history"]["train"]] == [2, 4, 6, 8, 10]

    png = (run.root / "report_loss.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    width, height = struct.unpack(">II", png[16:24])          # IHDR
    assert png[12:16] == b"IHDR" and width >= 300 and height >= 200

    md = (run.root / "report.md").read_text()
    assert "![loss curve](report_loss.png)" in md
    assert f"| base | {base['loss']:.4f} |" in md and f"| fine-tuned | {tuned['loss']:.4f} |" in md
    assert md.count("**Fine-tuned**") == 3
    # Written atomically: no temporary files left beside them.
    assert not list(run.root.glob(".report*"))


def test_report_prompts_are_the_held_out_rows(tiny_run):
    """The prompts the report generates for are exactly the samples of the eval split."""
    from ftlib.data import pack, tokenize_sample
    from ftlib.model import load_tokenizer, resolve_model_path
    from ftlib.report import held_out_eval_dataset, held_out_samples

    cfg, run, _ = tiny_run
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    held = held_out_samples(cfg, tokenizer)
    eval_ds = held_out_eval_dataset(cfg, tokenizer)
    rows = pack([tokenize_sample(tokenizer, s, cfg.data) for s in held], cfg.data.max_length)
    assert [r["input_ids"] for r in rows] == eval_ds["input_ids"]
    assert [r["labels"] for r in rows] == eval_ds["labels"]


def test_export_rerun_is_a_no_op_and_restores_a_deleted_file(tiny_run, hf_cache):
    cfg, run, _ = tiny_run
    manifest = run.manifest.read_bytes()
    hashes = _artifact_hashes(run)

    proc = _export(run, hf_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stdout
    assert run.manifest.read_bytes() == manifest and _artifact_hashes(run) == hashes

    weights = run.merged / "model.safetensors"
    weights.unlink()
    proc = _export(run, hf_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "artifacts/merged/model.safetensors is missing" in proc.stdout
    assert weights.is_file() and verify_manifest(run) == []
    # The merge is deterministic: the restored export is the published one, byte for byte.
    assert _artifact_hashes(run) == hashes and run.manifest.read_bytes() == manifest


def test_export_adds_gguf_and_modelfile_and_keeps_them(tiny_run, hf_cache):
    cfg, run, _ = tiny_run
    proc = _export(run, hf_cache, "--gguf", "q8_0,f16", "--ollama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_manifest(run) == []
    listed = {e["path"] for e in json.loads(run.manifest.read_text())["files"]}
    assert {f"artifacts/gguf/{cfg.name}-q8_0.gguf", f"artifacts/gguf/{cfg.name}-f16.gguf",
            "artifacts/Modelfile"} <= listed
    assert f"FROM ./gguf/{cfg.name}-q8_0.gguf" in run.modelfile.read_text()
    manifest, hashes = run.manifest.read_bytes(), _artifact_hashes(run)

    # Without flags: the manifest remembers what was asked; a deleted GGUF and Modelfile come back
    # identical (the Modelfile still points at the first type given).
    (run.gguf / f"{cfg.name}-q8_0.gguf").unlink()
    run.modelfile.unlink()
    proc = _export(run, hf_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_manifest(run) == []
    assert _artifact_hashes(run) == hashes and run.manifest.read_bytes() == manifest

    proc = _export(run, hf_cache, "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _artifact_hashes(run) == hashes and run.manifest.read_bytes() == manifest


def test_export_user_errors_exit_2(tiny_run, hf_cache, tmp_path, capsys):
    import shutil

    cfg, run, _ = tiny_run
    from ftlib import cli as export_cli

    unfinished = RunDir(tmp_path / "unfinished")
    unfinished.create()
    unfinished.config.write_text(run.config.read_text())
    damaged = RunDir(tmp_path / "damaged")
    shutil.copytree(run.root, damaged.root)
    (damaged.adapter / "adapter_model.safetensors").unlink()
    plain = RunDir(tmp_path / "plain")             # the run as training published it: no GGUF
    shutil.copytree(run.root, plain.root)
    shutil.rmtree(plain.gguf, ignore_errors=True)
    plain.modelfile.unlink(missing_ok=True)
    write_manifest(plain, {"model": cfg.model.name, "method": cfg.model.method})
    cases = [([str(tmp_path / "nope")], "not a run directory"),
             ([str(unfinished.root)], "has not finished training"),
             ([str(run.root), "--gguf", "q9_9"], "unknown GGUF type 'q9_9'"),
             ([str(damaged.root)], "adapter_model.safetensors is missing or differs from manifest.json"),
             ([str(plain.root), "--ollama"], "--ollama needs a GGUF file")]
    for argv, message in cases:
        assert export_cli.export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    proc = _export(unfinished, hf_cache)
    assert proc.returncode == 2 and "has not finished training" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_report_text_has_no_replacement_characters(tiny_run):
    """The tiny base model emits stray bytes of multi-byte characters; they must not reach the
    report as U+FFFD noise (inference.decode_text)."""
    cfg, run, _ = tiny_run
    report = json.loads((run.root / "report.json").read_text())
    texts = [s[k] for s in report["samples"] for k in ("base", "fine_tuned", "prompt")]
    assert texts and all("\ufffd" not in t for t in texts)
    assert "\ufffd" not in (run.root / "report.md").read_text()


def test_decode_text_drops_stray_bytes_but_keeps_characters():
    from ftlib.inference import decode_text
    from ftlib.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    whole = tokenizer("café ✓", add_special_tokens=False)["input_ids"]
    assert decode_text(tokenizer, whole) == tokenizer.decode(whole) == "café ✓"
    # "Ã" is the byte-level token of the lone byte 0xC3: the first half of a two-byte character.
    stray = tokenizer.convert_tokens_to_ids("Ã")
    assert stray != tokenizer.unk_token_id
    assert "\ufffd" in tokenizer.decode([stray] + whole)
    assert decode_text(tokenizer, [stray] + whole) == "café ✓"
