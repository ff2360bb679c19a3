"""Tiny models and tokenizers built deterministically from code, never downloaded.

`model.name: builtin:tiny-llama` in a config resolves to a directory under the shared HF cache
that this module builds on first use (a byte-level BPE trained on the bundled sample data and a
2-layer Llama with hidden size 64), then loads with `from_pretrained` like any local model. Tests,
CI and the README's first command use it; nothing needs the Hugging Face Hub.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .console import quiet_progress_bars
from .locks import file_lock
from .storage import staging_dir
from .templates import CHATML

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# Widths that are multiples of 256 (the *-256 variants) let llama.cpp build real K-quant blocks.
BUILTIN_MODELS: dict[str, dict] = {
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128},
    "tiny-llama-256": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512},
    "tiny-mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128},
    "tiny-qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128},
    # Mistral 7B's tokenizer layout (SentencePiece-style BPE with byte fallback), for debugging
    # configs/mistral.yaml on CPU: same tokenizer kind, same GGUF path.
    "tiny-mistral-spm": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "tokenizer": "spm"},
}

_WORDS = ("apple river stone cloud green quick light dark north south winter summer happy "
          "small large open close early late bright quiet loud warm cold fast slow left right "
          "cat dog bird fish tree house road bridge garden window paper music").split()
_OPPOSITES = {"happy": "sad", "small": "large", "open": "closed", "early": "late", "bright": "dim",
              "quiet": "loud", "warm": "cool", "cold": "hot", "fast": "slow", "left": "right",
              "north": "south", "winter": "summer", "light": "dark", "quick": "slow"}


def sample_alpaca_rows(n: int = 128, seed: int = 0) -> list[dict[str, str]]:
    """Repetitive instruction data whose loss falls within a few dozen steps on a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 5
        word = rng.choice(_WORDS)
        if kind == 0:
            rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        elif kind == 1:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}",
                         "output": f"The sum is {a + b}."})
        elif kind == 2:
            key = rng.choice(sorted(_OPPOSITES))
            rows.append({"instruction": f"What is the opposite of {key}?", "input": "",
                         "output": f"The opposite of {key} is {_OPPOSITES[key]}."})
        elif kind == 3:
            rows.append({"instruction": "Spell the word with dashes.", "input": word,
                         "output": "-".join(word)})
        else:
            count = rng.randint(2, 6)
            rows.append({"instruction": f"Repeat the word {count} times.", "input": word,
                         "output": " ".join([word] * count)})
    return rows


def _tokenizer_corpus() -> list[str]:
    rows = sample_alpaca_rows(512, seed=1)
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    lines += [" ".join(_WORDS), "user assistant system", "0 1 2 3 4 5 6 7 8 9 10 20 30 40"]
    return lines * 4


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE (any text encodes) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def build_spm_tokenizer(vocab_size: int = 512):
    """A SentencePiece-style tokenizer laid out like Mistral 7B's and Llama 2's tokenizer.json:
    <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (byte fallback for any character outside
    the vocabulary), then BPE pieces with "▁" for spaces and a "▁" prepended to the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def spm_style(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        return tok

    # Learn the pieces, then lay out the vocabulary as SentencePiece does (specials, bytes, pieces).
    learner = spm_style(models.BPE())
    # SentencePiece does not merge across words: split at each "▁" for learning only (the
    # final tokenizer, like Mistral's tokenizer.json, has no pre-tokenizer).
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    learner.train_from_iterator(_tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size - 3 - 256, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = spm_style(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.add_bos_token = True
    fast.chat_template = CHATML
    return fast


def build_model(path: str | Path, model_type: str = "llama", hidden_size: int = 64,
                intermediate_size: int = 128, num_hidden_layers: int = 2,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, seed: int = 0,
                initializer_range: float = 0.1, tokenizer: str = "byte-level") -> Path:
    """Write a tiny random-weight causal LM and its tokenizer ("byte-level" BPE or "spm") to
    `path` (save_pretrained)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_progress_bars()   # a "Writing model shards" bar in a --dry-run says nothing to the user
    path = Path(path)
    tokenizer = build_spm_tokenizer() if tokenizer == "spm" else build_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_builtin(name: str, cache_dir: str | Path) -> Path:
    """Directory of builtin model `name` under `cache_dir`, built once (array tasks share it)."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_MODELS:
        raise KeyError(key)
    final = Path(cache_dir) / "ftlib-builtin" / key
    with file_lock(final.with_name(f".{key}.lock")):
        if not (final / "config.json").exists():
            with staging_dir(final) as tmp:
                build_model(tmp, **BUILTIN_MODELS[key])
    return final


def write_sample_dataset(path: str | Path, n: int = 128) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in sample_alpaca_rows(n)))
    return path


if __name__ == "__main__":  # python -m ftlib.tiny OUT_DIR [builtin-name]
    import sys

    out, key = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "tiny-llama")
    print(build_model(out, **BUILTIN_MODELS[key]))
