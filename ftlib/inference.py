"""Generation primitives shared by the run report (report.py) and the adapter tool (generate.py):
decoding settings, the prompt as training rendered it, the stop tokens of a chat template, and
one completion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .templates import END_OF_TURN, NAMED_TEMPLATES, template_name_of


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def describe(self) -> str:
        if self.greedy:
            return f"greedy, at most {self.max_new_tokens} new tokens"
        return (f"sampling (temperature {self.temperature}, top-p {self.top_p}, seed {self.seed}), "
                f"at most {self.max_new_tokens} new tokens")


def template_name(tokenizer, configured: str | None = None) -> str | None:
    """The named template (chatml, llama3, mistral) a tokenizer renders with, if it is one of ours."""
    if configured in NAMED_TEMPLATES:
        return configured
    return template_name_of(getattr(tokenizer, "chat_template", None))


def stop_token_ids(tokenizer, configured_template: str | None = None) -> list[int]:
    """eos plus the end-of-turn tokens of the chat template.

    For a template that is not one of ftlib's named ones, every known end-of-turn token that the
    tokenizer has as a single token counts (<|im_end|>, <|eot_id|>)."""
    name = template_name(tokenizer, configured_template)
    names = END_OF_TURN[name] if name else sorted({t for ts in END_OF_TURN.values() for t in ts})
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in names:
        if token in vocab and vocab[token] != tokenizer.unk_token_id and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    return ids


def render_prompt(tokenizer, *, messages: list[dict] | None = None, prompt: str | None = None
                  ) -> tuple[str, bool]:
    """(text, add_special_tokens): a chat rendered with the template (which writes BOS itself,
    as in training), or raw text that the tokenizer encodes with its usual special tokens."""
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False
    return prompt or "", True


def model_device(model):
    import torch
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def place_on_gpu(model):
    """A model loaded without a device map (not quantized) goes to the GPU when there is one."""
    import torch
    if torch.cuda.is_available() and model_device(model).type == "cpu" and \
            not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model


def generate_text(model, tokenizer, text: str, *, add_special_tokens: bool, settings: GenerationSettings,
                  stop_ids: list[int]) -> dict[str, Any]:
    """One completion of `text`: {"output", "new_tokens", "stop": eos|end_of_turn|length}."""
    import torch
    from transformers import GenerationConfig

    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    device = model_device(model)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    # A fresh GenerationConfig: a model's own generation_config.json (sampling defaults of an
    # instruct model) must not change what --greedy means.
    values: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": stop_ids or None,
                              "pad_token_id": pad, "do_sample": not settings.greedy}
    if not settings.greedy:
        values.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        torch.manual_seed(settings.seed)   # per prompt: an output depends on its prompt alone
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=GenerationConfig(**values))
    new = out[0, input_ids.shape[1]:].tolist()
    stop = "length"
    if new and new[-1] in stop_ids:
        stop = "eos" if new[-1] == tokenizer.eos_token_id else "end_of_turn"
        new = new[:-1]
    return {"output": decode_text(tokenizer, new), "new_tokens": len(new), "stop": stop}


def decode_text(tokenizer, ids: list[int]) -> str:
    """Token ids as text, without U+FFFD noise.

    A byte-level tokenizer's tokens are bytes: a model (an untrained base above all) may end or
    interleave multi-byte characters with stray bytes, which decode to U+FFFD replacement marks.
    Those marks carry no text, so they are dropped; whole characters are kept as they are."""
    return tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
