"""configs/mistral.yaml debugged on CPU, as its header says: the same config with a tiny model of
Mistral 7B's tokenizer kind (builtin:tiny-mistral-spm, SentencePiece-style BPE with byte fallback)
leaves an adapter, a merged model, GGUF f16/q8_0 and an Ollama Modelfile; the prompt Ollama builds
from the Modelfile is, token for token in llama.cpp, the prompt the model was trained on."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_DATA, subprocess_env
from ftlib.storage import RunDir, verify_manifest

sys.path.insert(0, str(REPO / "tests" / "export"))   # the GGUF reader and Go template fixture live there
from test_gguf import _field, _reader  # noqa: E402
from test_ollama import renderer  # noqa: E402,F401  (the Go text/template fixture)

def documented_cpu_debug_overrides() -> list[str]:
    """The key=value overrides of the CPU debug command in configs/mistral.yaml's comments."""
    text = (REPO / "configs" / "mistral.yaml").read_text()
    block = text.split("# Debug this config on CPU", 1)[1].split("\ntracking:", 1)[0]
    command = " ".join(line.lstrip("#").strip().rstrip("\\") for line in block.splitlines() if "=" in line)
    return [token for token in command.split() if "=" in token and "." in token.split("=")[0]]


CPU_DEBUG = documented_cpu_debug_overrides()


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_cache) -> RunDir:
    root = tmp_path_factory.mktemp("mistral") / "runs"
    proc = subprocess.run([sys.executable, "jobs/submit.py", str(REPO / "configs" / "mistral.yaml"), "--local",
                           *CPU_DEBUG, f"storage.root={root}", f"storage.hf_cache={hf_cache}",
                           f"data.train={SAMPLE_DATA}", "tracking.backends=[none]"],
                          cwd=REPO, env=subprocess_env(hf_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunDir(root / "mistral-7b-qlora")


def test_the_documented_cpu_debug_command_shows_loss_falling(run):
    import json
    assert "model.name=builtin:tiny-mistral-spm" in CPU_DEBUG and "training.max_steps=30" in CPU_DEBUG
    report = json.loads((run.root / "report.json").read_text())
    base, tuned = report["base"]["loss"], report["fine_tuned"]["loss"]
    assert tuned < base - 0.5, (base, tuned)


def test_cpu_debug_run_leaves_every_artifact(run):
    assert verify_manifest(run) == []
    assert (run.adapter / "adapter_model.safetensors").exists() and (run.merged / "config.json").exists()
    assert sorted(p.name for p in run.gguf.glob("*.gguf")) == ["mistral-7b-qlora-f16.gguf",
                                                               "mistral-7b-qlora-q8_0.gguf"]
    reader = _reader(run.gguf / "mistral-7b-qlora-f16.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "llama"     # SentencePiece-style, as Mistral 7B
    modelfile = run.modelfile.read_text()
    assert "FROM ./gguf/mistral-7b-qlora-f16.gguf" in modelfile
    assert "[INST] {{ .Content }} [/INST]" in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_ollama_prompt_is_the_training_prompt_in_llama_cpp_tokens(run, renderer):  # noqa: F811
    from transformers import AutoTokenizer

    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (containers/build-llama-cpp.sh --with-python .venv)")
    tokenizer = AutoTokenizer.from_pretrained(run.merged)     # the tokenizer and template of training
    messages = [{"role": "user", "content": "Reverse the word: apple"},
                {"role": "assistant", "content": "elppa"},
                {"role": "user", "content": "Now spell it with dashes:\n  garden"}]
    trained = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = re.search(r'^TEMPLATE """(.*?)"""$', run.modelfile.read_text(), re.S | re.M).group(1)
    prompt = renderer(template, messages)
    assert prompt == trained
    llm = llama_cpp.Llama(model_path=str(run.gguf / "mistral-7b-qlora-q8_0.gguf"), n_ctx=256, n_threads=2,
                          verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
        tokenizer.encode(trained, add_special_tokens=False)
