"""Named chat templates.

A base model (Mistral-7B-v0.1, Llama-3-8B) ships no chat template, so the config names one
(`data.chat_template: chatml`). Every template here is a Jinja chat template, set on the
tokenizer, so that the training pipeline, the merged model, the GGUF file and the Ollama
Modelfile all render conversations from one definition. `tokenizer` keeps the tokenizer's own.

Templates must be prefix-consistent: rendering messages[:i] with add_generation_prompt=True is a
prefix of rendering messages[:i+1]. The data pipeline relies on it to find the assistant spans
that carry loss (see data.render_conversation).
"""
from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's [INST] format; a system prompt goes before the first instruction.
MISTRAL = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}

# The tokens that end an assistant turn, per template; generation (and Ollama) stops on them.
END_OF_TURN: dict[str, list[str]] = {
    "chatml": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
    "mistral": [],  # ends with eos_token
}

TEMPLATE_CHOICES = ["tokenizer", *NAMED_TEMPLATES]


def template_name_of(chat_template: str | None) -> str | None:
    """The name of a known template from its Jinja text (for tokenizers that carry one of ours)."""
    for name, text in NAMED_TEMPLATES.items():
        if chat_template == text:
            return name
    return None
