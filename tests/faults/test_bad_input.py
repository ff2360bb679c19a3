"""Bad input of every kind is one line, exit status 2, before any work, and the same line in every
mode: --dry-run, --local and a submission to the real local Slurm cluster, which then holds no job.

The cases are a held-out corpus, tests/faults/bad_configs/*.yaml, one per file:
    expect:        the fragment the line must contain (expect_also: a second one)
    overrides:     key=value items on top of configs/tiny.yaml (or of `config`)
    config:        a whole config file instead (`defaults` may name {repo}/configs/...)
    where: file    the line must name that file (the value came from it, not the command line)
    files:         files the case needs, written under {tmp} ({name: text} or {name: {text, mode}})
    env:           environment variables during the case
    block_modules: modules made unimportable, as on a machine without that optional extra
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import NO_SLURM, REPO, SAMPLE_DATA, TINY_CONFIG, slurm_cluster_up, subprocess_env
from ftlib import cli
from ftlib.config import ConfigError, load_config

CORPUS = Path(__file__).resolve().parent / "bad_configs"
CASES = sorted(CORPUS.glob("*.yaml"))
# Every case's Slurm job name starts with this: at the end, the cluster must know none of them.
JOB_PREFIX = f"ftlib-bad-{uuid.uuid4().hex[:8]}"


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp)).replace("{repo}", str(REPO)).replace("{sample}", str(SAMPLE_DATA))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def materialize(case: Path, tmp: Path) -> dict:
    """The case's config path, overrides, expected fragments and environment, under `tmp`."""
    spec = _fill(yaml.safe_load(case.read_text()), tmp)
    assert spec.get("expect"), f"{case.name}: no expect"
    for name, content in (spec.get("files") or {}).items():
        content = content if isinstance(content, dict) else {"text": content}
        path = tmp / name
        path.write_text(content["text"])
        os.chmod(path, int(str(content.get("mode", "0600")), 8))
    config = TINY_CONFIG
    if spec.get("config"):
        config = tmp / f"{case.stem}.yaml"
        config.write_text(yaml.safe_dump(spec["config"]))
    return {"config": config, "overrides": spec.get("overrides") or [],
            "expect": [spec["expect"]] + ([spec["expect_also"]] if spec.get("expect_also") else []),
            "where_file": spec.get("where") == "file", "env": spec.get("env") or {},
            "block": spec.get("block_modules") or []}


def test_the_corpus_is_large_and_spans_the_sections():
    assert len(CASES) >= 25
    sections = set()
    for case in CASES:
        spec = yaml.safe_load(case.read_text())
        sections.add(spec["expect"].split(".")[0].split(":")[0])
    assert {"training", "lora", "quantization", "data", "model", "slurm", "distributed"} <= sections, sections


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_config_is_one_line_and_exit_2_in_every_mode(case, tmp_path, hf_cache, capsys, monkeypatch):
    spec = materialize(case, tmp_path)
    for name, value in spec["env"].items():
        monkeypatch.setenv(name, value)
    for module in spec["block"]:
        monkeypatch.setitem(sys.modules, module, None)

    def must_not_run(runs):   # a safety net only: validation must have stopped --local already
        raise AssertionError(f"{case.name}: --local got past validation")
    monkeypatch.setattr(cli, "run_local_plan", must_not_run)

    root = tmp_path / "runs"
    args = [str(spec["config"]), f"storage.root={root}", f"storage.hf_cache={hf_cache}", f"data.train={SAMPLE_DATA}",
            f"slurm.job_name={JOB_PREFIX}-{case.stem}", *spec["overrides"]]
    lines = {}
    for mode, flags in (("--dry-run", ["--dry-run"]), ("--local", ["--local"]), ("submission", [])):
        code = cli.submit_main([*args, *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{case.name} {mode}: exit status {code}, stderr:\n{err}"
        assert len(err.splitlines()) == 1 and "Traceback" not in err, f"{case.name} {mode}:\n{err}"
        lines[mode] = err
    assert len(set(lines.values())) == 1, f"{case.name}: the modes disagree:\n" + "\n".join(
        f"  {mode}: {line}" for mode, line in lines.items())
    line = lines["submission"]
    assert line.startswith("error: ")
    for fragment in spec["expect"]:
        assert fragment in line, f"{case.name}: {fragment!r} not in:\n{line}"
    if spec["where_file"]:
        assert line.startswith(f"error: {spec['config']}: "), line
    assert not root.exists(), f"{case.name}: something was written under storage.root"


@pytest.mark.slurm
def test_no_bad_case_reached_the_cluster():
    """Runs after the cases (file order): the accounting database and the queue know none of them."""
    if not slurm_cluster_up():
        pytest.skip(NO_SLURM)
    time.sleep(2)   # what slurmctld accepted reaches slurmdbd within its commit interval
    names = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-S", "now-2hours"],
                           capture_output=True, text=True, check=True).stdout.split()
    queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout.split()
    assert not [n for n in names + queued if n.startswith(JOB_PREFIX)]


def test_the_real_command_gives_the_same_single_line(tmp_path, hf_cache, capsys):
    """The entry point itself, in a fresh process (a submission, the mode with the most machinery):
    exit status 2, the same line as in this process, last on stderr, no traceback."""
    args = [str(TINY_CONFIG), f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
            f"data.train={SAMPLE_DATA}", f"slurm.job_name={JOB_PREFIX}-cli",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_projj]"]
    proc = subprocess.run([sys.executable, "jobs/submit.py", *args], cwd=REPO, env=subprocess_env(hf_cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "lora.target_modules: 'o_projj' matches no module of builtin:tiny-llama; did you mean 'o_proj'?" in line
    assert cli.submit_main([*args, "--local"]) == 2
    assert capsys.readouterr().err.strip() == line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- machine-dependent settings
GPU_ONLY = [["training.bf16=true"], ["training.fp16=true"], ["quantization.bnb_4bit_compute_dtype=bfloat16"],
            ["training.optim=paged_adamw_8bit"],
            ["training.bf16=true", "quantization.bnb_4bit_compute_dtype=float16", "training.optim=paged_adamw_32bit"]]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="these are refused on CPU-only machines")
@pytest.mark.parametrize("overrides", GPU_ONLY, ids=[" ".join(o) for o in GPU_ONLY])
def test_gpu_only_settings_are_refused_for_local_on_a_cpu_but_not_for_slurm(overrides, tmp_path, hf_cache, capsys):
    args = [str(TINY_CONFIG), f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
            f"data.train={SAMPLE_DATA}", *overrides]
    assert cli.submit_main([*args, "--local", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    first_key = overrides[0].split("=")[0]
    assert err.startswith(f"error: the command line: {first_key}: --local runs on this machine, which has no "
                          "CUDA GPU"), err
    for item in overrides:
        assert item in err
    # The fix is in the line: configs/mistral.yaml's CPU debug command, whose overrides it repeats.
    header = "\n".join(line for line in (REPO / "configs" / "mistral.yaml").read_text().splitlines()
                       if line.startswith("#"))
    assert "configs/mistral.yaml's header" in err
    for fix in ("training.bf16=false", "quantization.bnb_4bit_compute_dtype=float32", "training.optim=adamw_torch"):
        assert fix in err and fix in header
    # A login node without GPUs submits the same config: the job's node has them.
    assert cli.submit_main([*args, "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_the_cpu_debug_command_of_mistral_yaml_passes_local_validation(tmp_path, hf_cache, capsys):
    header = [line.lstrip("# ").rstrip("\\ ").strip() for line in
              (REPO / "configs" / "mistral.yaml").read_text().splitlines() if line.startswith("#")]
    command = "python jobs/submit.py configs/mistral.yaml --local"
    start = next(i for i, line in enumerate(header) if line.startswith(command))
    words = " ".join(header[start:start + 6]).split()
    overrides = [w for w in words[3:] if "=" in w and not w.startswith("#")]
    assert "training.bf16=false" in overrides
    code = cli.submit_main([str(REPO / "configs" / "mistral.yaml"), "--local", "--dry-run", *overrides,
                            f"storage.root={tmp_path / 'runs'}", f"storage.hf_cache={hf_cache}",
                            f"data.train={SAMPLE_DATA}"])
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------- values that are fine
def test_values_at_the_edge_of_their_range_are_accepted():
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "training.warmup_steps=0", "training.save_steps=0.5",
                                    "slurm.gpus_per_node=0", "slurm.max_requeues=0", "slurm.signal_delay_s=0",
                                    "data.max_bad_fraction=1.0", "lora.lora_dropout=0.0", "training.max_steps=-1",
                                    "training.seed=4294967295"])
    assert cfg.data.max_bad_fraction == 1.0 and cfg.training["save_steps"] == 0.5


def test_remote_code_is_accepted_from_a_pinned_commit():
    commit = "0123456789abcdef0123456789abcdef01234567"
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "model.name=some-org/custom-model",
                                    "model.trust_remote_code=true", f"model.revision={commit}"])
    assert cfg.model.revision == commit
    assert load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}"]).model.trust_remote_code is False   # the default


# ---------------------------------------------------------------------------- relative paths at submission
def test_a_relative_hf_cache_becomes_absolute_in_the_sbatch_script(tmp_path, monkeypatch):
    """HF_HOME=./.cache/huggingface would be a different cache for every directory sbatch runs from."""
    from ftlib.launch.slurm import make_plan, sbatch_script
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "storage.hf_cache=./.cache/huggingface",
                                    f"storage.root={tmp_path / 'runs'}"])
    script = sbatch_script(make_plan(cfg))
    assert f"export HF_HOME={tmp_path}/.cache/huggingface\n" in script
    assert "HF_HOME=./" not in script


# ---------------------------------------------------------------------------- lora.target_modules at 7B
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "sliding_window": 4096, "tie_word_embeddings": False}


def test_target_modules_of_a_7b_model_are_checked_from_its_config_alone(tmp_path, capsys):
    """A directory with only Mistral-7B's config.json: the model is built on the meta device (no
    weights exist, none are allocated), and peft's own matching decides."""
    import json

    from ftlib.validation import check_target_modules, model_modules
    model_dir = tmp_path / "mistral-7b-config-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MISTRAL_7B))
    base = [f"data.train={SAMPLE_DATA}", f"model.name={model_dir}"]
    cfg = load_config(TINY_CONFIG, [*base, "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_projj]"])
    with pytest.raises(ConfigError, match=r"'up_projj' matches no module of .*mistral-7b-config-only; did you mean "
                                          r"'up_proj'\?"):
        check_target_modules(cfg)
    modules = model_modules(str(model_dir), None, False)
    assert sum(1 for _, kind, _ in modules if kind == "Linear") == 32 * 7 + 1      # 7 per layer + lm_head
    check_target_modules(load_config(TINY_CONFIG, [*base, "lora.target_modules=[q_proj,v_proj]"]))
    check_target_modules(load_config(TINY_CONFIG, [*base, "lora.target_modules=model\\.layers\\.3\\..*_proj"]))
    # Not readable here (an uncached hub model, offline): skipped with a note, not refused.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    check_target_modules(load_config(TINY_CONFIG, [f"data.train={SAMPLE_DATA}", "model.name=some-org/not-cached",
                                                   "lora.target_modules=[q_proj]"]))
    assert "note: lora.target_modules not checked: the config of some-org/not-cached is not readable here" \
        in capsys.readouterr().err
