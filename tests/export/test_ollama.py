"""Ollama Modelfile: the TEMPLATE renders exactly the prompt the model was trained on.

The Go template is rendered by Go's own text/template (the engine Ollama uses), through
tests/tools/render_ollama_template.go, which also reproduces how Ollama's chat endpoint feeds it
(the Modelfile's SYSTEM as a leading system message, collated messages, .System). Needs `go`
(Debian: golang-go); without it those tests skip and say so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from ftlib.export import ollama
from ftlib.export.gguf import export_gguf
from ftlib.templates import END_OF_TURN, NAMED_TEMPLATES
from ftlib.tiny import BUILTIN_MODELS, build_model

TOOL = REPO / "tests" / "tools" / "render_ollama_template.go"
NAMES = list(NAMED_TEMPLATES)

SYSTEM = "You are terse. Answer in one line."
CONVERSATIONS = {
    "system+user": [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "Reverse the word: apple"}],
    "user": [{"role": "user", "content": "What is the opposite of happy?"}],
    "multi-turn": [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": "Add 2 and 3."},
                   {"role": "assistant", "content": "The sum is 5."},
                   {"role": "user", "content": "Now spell it:\n  with dashes {{ braces }} \"quotes\""}],
}
ANSWER = "e-l-p-p-a"


@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    """A compiled renderer: (template, messages, system) -> the string Ollama would feed the model."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go): the Ollama TEMPLATE is "
                    "rendered with Go's text/template, as Ollama does")
    out = tmp_path_factory.mktemp("go") / "render"
    cache = tmp_path_factory.mktemp("gocache")
    # one file, standard library only: no module, no network, no cgo
    env = dict(os.environ, GOCACHE=str(cache), GO111MODULE="off", GOFLAGS="", CGO_ENABLED="0")
    subprocess.run([go, "build", "-o", str(out), str(TOOL)], check=True, env=env, capture_output=True)

    def render(template: str, messages: list[dict], system: str = "") -> str:
        payload = json.dumps({"template": template, "messages": messages, "system": system})
        result = subprocess.run([str(out)], input=payload, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    return render


@pytest.fixture(scope="module")
def tokenizer():
    from ftlib.tiny import build_tokenizer

    return build_tokenizer()


def _jinja(tokenizer, name: str, messages: list[dict], generation: bool) -> str:
    tokenizer.chat_template = NAMED_TEMPLATES[name]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A run's artifacts directory: the tiny model's f16 GGUF under gguf/."""
    root = tmp_path_factory.mktemp("run")
    model = build_model(root / "merged", **BUILTIN_MODELS["tiny-llama"])
    export_gguf(model, root / "artifacts" / "gguf" / "tiny-f16.gguf", "f16")
    return root / "artifacts"


def _template_of(modelfile_text: str) -> str:
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M)
    assert match, modelfile_text
    return match.group(1)


# ----------------------------------------------------------------------- the rendered prompt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_template_renders_the_training_prompt(renderer, tokenizer, artifacts, name, conversation):
    messages = CONVERSATIONS[conversation]
    path = ollama.write_modelfile(artifacts / f"Modelfile.{name}", artifacts / "gguf" / "tiny-f16.gguf", name)
    template = _template_of(path.read_text())
    prompt = _jinja(tokenizer, name, messages, generation=True)
    assert renderer(template, messages) == prompt

    # The training string is that prompt, the answer, and the template's end of turn.
    full = _jinja(tokenizer, name, [*messages, {"role": "assistant", "content": ANSWER}], generation=False)
    suffix = ollama.ollama_template(name, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token).turn_suffix
    assert full == prompt + ANSWER + suffix
    # and Ollama renders the same for a follow-up turn that includes that answer
    follow_up = [*messages, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Again."}]
    assert renderer(template, follow_up) == _jinja(tokenizer, name, follow_up, generation=True)
    assert _jinja(tokenizer, name, follow_up, generation=True).startswith(full)


@pytest.mark.parametrize("name", NAMES)
def test_modelfile_system_prompt_is_used_like_training(renderer, tokenizer, artifacts, name):
    """SYSTEM in the Modelfile + a request without a system message = training with that system."""
    path = ollama.write_modelfile(artifacts / f"Modelfile.sys.{name}", "tiny-f16.gguf", name, system=SYSTEM)
    text = path.read_text()
    assert f'SYSTEM """{SYSTEM}"""' in text
    user_only = CONVERSATIONS["user"]
    with_system = [{"role": "system", "content": SYSTEM}, *user_only]
    assert renderer(_template_of(text), user_only, system=SYSTEM) == _jinja(tokenizer, name, with_system, True)
    # a request's own system message replaces the Modelfile's, as in Ollama
    own = [{"role": "system", "content": "Other."}, *user_only]
    assert renderer(_template_of(text), own, system=SYSTEM) == _jinja(tokenizer, name, own, True)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_bos_left_to_the_runtime_when_it_adds_one(renderer, tokenizer, name):
    """When the GGUF says the runtime prepends BOS, the TEMPLATE must not add a second one."""
    messages = CONVERSATIONS["system+user"]
    own = ollama.ollama_template(name, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, add_bos=False)
    runtime = ollama.ollama_template(name, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, add_bos=True)
    prompt = _jinja(tokenizer, name, messages, generation=True)
    assert prompt.startswith(tokenizer.bos_token)
    assert renderer(own.template, messages) == prompt
    assert tokenizer.bos_token + renderer(runtime.template, messages) == prompt


# ----------------------------------------------------------------------------- the Modelfile


@pytest.mark.parametrize("name", NAMES)
def test_modelfile_contents(artifacts, tokenizer, name):
    path = ollama.write_modelfile(artifacts / "Modelfile", artifacts / "gguf" / "tiny-f16.gguf", name,
                                  parameters={"num_ctx": 2048})
    assert path == artifacts / "Modelfile"
    lines = path.read_text().splitlines()
    assert lines[0] == "FROM ./gguf/tiny-f16.gguf"
    assert (path.parent / lines[0].split(" ", 1)[1]).is_file()
    stops = [line.split(" ", 2)[2] for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == [f'"{t}"' for t in [*END_OF_TURN[name], tokenizer.eos_token]]
    assert "PARAMETER num_ctx 2048" in lines
    assert not any(line.startswith("SYSTEM") for line in lines)
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_modelfile_from_the_training_tokenizer(artifacts, tokenizer):
    """publish passes the tokenizer (whose template is a named one) and the GGUF's file name."""
    tokenizer.chat_template = NAMED_TEMPLATES["chatml"]
    path = ollama.write_modelfile(artifacts / "Modelfile", "tiny-f16.gguf", tokenizer)
    text = path.read_text()
    assert text.startswith("FROM ./gguf/tiny-f16.gguf\n")
    assert _template_of(text) == ollama.ollama_template("chatml", bos_token="<s>", eos_token="</s>").template
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text


def test_special_tokens_come_from_the_gguf(artifacts):
    assert ollama.gguf_special_tokens(artifacts / "gguf" / "tiny-f16.gguf") == ("<s>", "</s>", False)


def test_unknown_jinja_template_is_refused(artifacts):
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError) as info:
        ollama.write_modelfile(artifacts / "Modelfile.bad", "tiny-f16.gguf", custom)
    message = str(info.value)
    assert "\n" not in message
    assert "data.chat_template" in message and "export.ollama: false" in message
    assert "chatml, llama3, mistral" in message
    assert not (artifacts / "Modelfile.bad").exists()
    with pytest.raises(ValueError, match="no chat template"):
        ollama.resolve_template_name(None)


def test_tokenizer_template_equal_to_a_named_one_is_recognized():
    for name, text in NAMED_TEMPLATES.items():
        assert ollama.resolve_template_name(text) == name
        assert ollama.resolve_template_name(name) == name


def test_system_prompt_that_cannot_be_quoted_is_refused():
    with pytest.raises(ValueError, match='"""'):
        ollama.modelfile_text("./gguf/m.gguf", "chatml", bos_token="<s>", eos_token="</s>",
                              system='say """hi"""')


def test_rewrite_is_atomic(artifacts, monkeypatch):
    """A failed rewrite keeps the previous Modelfile whole."""
    path = ollama.write_modelfile(artifacts / "Modelfile.atomic", "tiny-f16.gguf", "chatml")
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ollama.write_modelfile(path, "tiny-f16.gguf", "llama3", system="x")
    monkeypatch.undo()
    assert path.read_text() == before
    assert not [p for p in artifacts.iterdir() if p.name.endswith(".tmp")]
