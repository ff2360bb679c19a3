"""Ollama Modelfile for an exported GGUF.

    write_modelfile(run.modelfile, run.gguf / "model-q4_k_m.gguf", "chatml", system="Be brief.")

writes `artifacts/Modelfile`:

    FROM ./gguf/model-q4_k_m.gguf
    TEMPLATE \"\"\"...Go template...\"\"\"
    PARAMETER stop "<|im_end|>"
    PARAMETER stop "</s>"
    SYSTEM \"\"\"Be brief.\"\"\"

The TEMPLATE is a translation of the Jinja chat template used in training (ftlib's named
templates chatml, llama3 and mistral; a tokenizer whose template is one of them is recognized),
so that Ollama renders exactly the prompt string the model was trained on: for messages that end
with a user turn, the Go template gives `tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`. An arbitrary Jinja template cannot be translated faithfully; it is
refused with a one-line error.

Ollama's side, which the template is written for: a chat request's messages go to `.Messages`
(`.Role`, `.Content`); the Modelfile's SYSTEM becomes a leading system message when the request
has none; every system message's text is also in `.System` (recent Ollama keeps system messages in
`.Messages` too, older versions removed them, so the template prints `.System` once at the start
and skips system messages in the loop, which renders the same under both). A leading BOS token is
left out of the TEMPLATE when the GGUF says the runtime adds it (`tokenizer.ggml.add_bos_token`),
so the model never sees two.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..storage import atomic_write_text
from ..templates import END_OF_TURN, NAMED_TEMPLATES, template_name_of

MODELFILE = "Modelfile"

# Go text/template sources per named template. `{BOS}`, `{EOS}` are replaced by the (escaped)
# token texts; no `{{-`/`-}}` trim markers, so every newline is exactly where Jinja puts it.
_GEN = '{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
_GO_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ range $i, $m := .Messages }}"
        '{{ if ne $m.Role "system" }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}'
        + _GEN + "<|im_start|>assistant\n{{ end }}"
        "{{ end }}"
    ),
    "llama3": (
        "{BOS}"
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ range $i, $m := .Messages }}"
        '{{ if ne $m.Role "system" }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n'
        "{{ $m.Content }}<|eot_id|>{{ end }}"
        + _GEN + "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
        "{{ end }}"
    ),
    # Mistral's [INST] format has no generation prompt: the prompt ends with " [/INST]".
    "mistral": (
        "{BOS}"
        "{{ if .System }}{{ .System }}\n\n{{ end }}"
        "{{ range .Messages }}"
        '{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}{EOS}{{ end }}'
        "{{ end }}"
    ),
}

# What follows an assistant message's content in the training string (the end of its turn).
_TURN_SUFFIX = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "{EOS}"}


@dataclass(frozen=True)
class OllamaTemplate:
    """A named chat template translated for Ollama."""

    name: str
    template: str  # Go text/template
    stops: list[str]  # PARAMETER stop values: end-of-turn tokens, then eos
    turn_suffix: str  # text after an assistant message's content in the training string


def resolve_template_name(chat_template: str | None) -> str:
    """A named template from a name or from Jinja text equal to one; else ValueError (one line)."""
    if chat_template in NAMED_TEMPLATES:
        return chat_template  # type: ignore[return-value]
    name = template_name_of(chat_template)
    if name is None:
        what = ("no chat template" if not chat_template
                else "a chat template that is not one of ftlib's named templates")
        raise ValueError(
            f"Ollama export: the model has {what}, and only the named templates "
            f"({', '.join(NAMED_TEMPLATES)}) can be translated to an Ollama TEMPLATE: set "
            f"data.chat_template to one of them, or export.ollama: false")
    return name


def _go_literal(text: str) -> str:
    """Text placed verbatim in a Go template (only `{{` would be read as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(chat_template: str, *, bos_token: str | None, eos_token: str,
                    add_bos: bool = False) -> OllamaTemplate:
    """Translate a named template (or Jinja text equal to one) to Ollama's Go template.

    bos_token / eos_token: the tokenizer's texts (Jinja's bos_token / eos_token).
    add_bos: the runtime prepends BOS itself (the GGUF's tokenizer.ggml.add_bos_token); then the
    template's leading bos_token is left out so the model does not get it twice."""
    name = resolve_template_name(chat_template)
    jinja = NAMED_TEMPLATES[name]
    if "bos_token" in jinja and not bos_token and not add_bos:
        raise ValueError(f"Ollama export: template {name} starts with bos_token but the tokenizer has none")
    bos = "" if add_bos else _go_literal(bos_token or "")
    template = _GO_TEMPLATES[name].replace("{BOS}", bos).replace("{EOS}", _go_literal(eos_token))
    stops: list[str] = []
    for token in [*END_OF_TURN[name], eos_token]:
        if token and token not in stops:
            stops.append(token)
    suffix = _TURN_SUFFIX[name].replace("{EOS}", eos_token)
    return OllamaTemplate(name, template, stops, suffix)


def _quoted(value: str, what: str) -> str:
    if '"' in value or "\n" in value or "\\" in value:
        raise ValueError(f"Ollama export: {what} {value!r} cannot be written as a Modelfile string")
    return f'"{value}"'


def _triple_quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f'Ollama export: {what} contains """, which a Modelfile cannot hold')
    return f'"""{value}"""'


def modelfile_text(gguf_ref: str, chat_template: str, *, bos_token: str | None, eos_token: str,
                   add_bos: bool = False, system: str | None = None,
                   parameters: dict[str, object] | None = None) -> str:
    """The Modelfile's text. gguf_ref: the FROM path as written (e.g. ./gguf/model-q8_0.gguf)."""
    translated = ollama_template(chat_template, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos)
    lines = [f"FROM {gguf_ref}", f"TEMPLATE {_triple_quoted(translated.template, 'the template')}"]
    lines += [f"PARAMETER stop {_quoted(stop, 'stop token')}" for stop in translated.stops]
    for key, value in (parameters or {}).items():
        if key == "stop":
            raise ValueError("Ollama export: stop parameters come from the chat template; do not pass them")
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system, 'the system prompt')}")
    return "\n".join(lines) + "\n"


def gguf_special_tokens(gguf_path: str | os.PathLike) -> tuple[str | None, str, bool]:
    """(bos text, eos text, add_bos) as stored in a GGUF file, read with gguf.GGUFReader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def scalar(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{gguf_path} has no tokenizer metadata")
    bos_id, eos_id = scalar("tokenizer.ggml.bos_token_id"), scalar("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise ValueError(f"{gguf_path} has no eos token id")

    def token(index: int) -> str:
        return tokens.contents(index)

    return (None if bos_id is None else token(bos_id), token(eos_id),
            bool(scalar("tokenizer.ggml.add_bos_token")))


def write_modelfile(modelfile: str | os.PathLike, gguf_path: str | os.PathLike, chat_template, *,
                    system: str | None = None, parameters: dict[str, object] | None = None) -> Path:
    """Write the Modelfile at `modelfile` (atomically) for the GGUF at `gguf_path`.

    gguf_path: the GGUF file; a bare file name means `<Modelfile's dir>/gguf/<name>` (the run layout).
    FROM is written relative to the Modelfile's directory (artifacts/Modelfile -> ./gguf/<file>.gguf),
    so the artifacts directory can be moved or copied as a whole.
    chat_template: a named template, the Jinja text used in training, or the training tokenizer
    (its `chat_template` is used).
    system: the SYSTEM prompt, if any. parameters: extra `PARAMETER key value` lines (not stop).
    The BOS/EOS texts and whether the runtime adds BOS are read from the GGUF itself, so the
    Modelfile always matches the file it points at."""
    modelfile, gguf_path = Path(modelfile), Path(gguf_path)
    if not isinstance(chat_template, str) and chat_template is not None:
        chat_template = getattr(chat_template, "chat_template", None)
    # Fail on the template first: it is the error a user can fix in the config.
    resolve_template_name(chat_template)
    if gguf_path.parent == Path(".") and not gguf_path.is_absolute():
        gguf_path = modelfile.parent / "gguf" / gguf_path.name
    rel = Path(os.path.relpath(gguf_path.resolve(), modelfile.parent.resolve())).as_posix()
    ref = rel if rel.startswith("../") else f"./{rel}"
    bos, eos, add_bos = gguf_special_tokens(gguf_path)
    text = modelfile_text(ref, chat_template, bos_token=bos, eos_token=eos, add_bos=add_bos,
                          system=system, parameters=parameters)
    return atomic_write_text(modelfile, text)
