"""The tokenizer vocabulary of a GGUF file: a saved Hugging Face tokenizer -> llama.cpp's
`tokenizer.ggml.*` keys and the chat template.

    tok = tokenizer_metadata(model_dir, config["vocab_size"], chat_template=None)
    add_tokenizer_metadata(writer, tok)   # a gguf.GGUFWriter

Two kinds of tokenizer.json, as llama.cpp's converter (convert_hf_to_gguf.py) writes them:
byte-level BPE (Llama 3, Qwen2, Mistral Nemo) as llama.cpp's `gpt2` model (tokens, token types,
merges, the pre-tokenizer name `tokenizer.ggml.pre`, found by llama.cpp's check hash or by the
split regex); SentencePiece-style BPE with byte fallback (Mistral 7B v0.1-v0.3, Llama 2) as
llama.cpp's `llama` model (tokens, scores that order the merges, byte/control/unknown token
types, add_space_prefix). For both: bos/eos/pad/unk ids, add_bos/add_eos and the chat template.
Other tokenizers are refused with a one-line error; `check_tokenizer_support` finds that out
before training. ftlib.export.gguf (config, tensors, the file) imports this module; this module
knows nothing of tensors or of how the file is laid out.
"""
from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path
from typing import Any

# llama.cpp's check text for BPE pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre): the
# sha256 of str(tokenizer.encode(CHKTXT)) names the pre-tokenizer that llama.cpp implements.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The entries of llama.cpp's table (llama-cpp-python 0.3.36) for the families ftlib exports.
_KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM
}
# Split regexes (as tokenizer.json spells them) of the pre-tokenizers llama.cpp implements, for
# tokenizers whose vocabulary is not in the table above (e.g. retrained or extended ones).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _pre_tokenizer_name(tokenizer, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)."""
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh in _KNOWN_PRE_TOKENIZERS:
        return _KNOWN_PRE_TOKENIZERS[chkhsh]
    # A tokenizer trained here (ftlib's tiny models, a fresh BPE) has no entry in llama.cpp's
    # table; the plain GPT-2 byte-level pre-tokenizer is llama.cpp's `gpt-2`, regex for regex.
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # Qwen2's NFC changes no ordinary text; others might
        pass
    elif (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        pattern = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated"
                and not split.get("invert") and pattern in _KNOWN_SPLITS
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False)):
            return _KNOWN_SPLITS[pattern]
    raise ValueError(
        "GGUF export: unrecognized byte-level BPE pre-tokenizer (its llama.cpp check hash "
        f"{chkhsh} is not one of Llama 3, Qwen2, GPT-2, Mistral Nemo, SmolLM, and its pre_tokenizer "
        "is neither GPT-2 ByteLevel nor a Llama 3 or Qwen2 split): llama.cpp would split text "
        "differently from training; convert this "
        "model with llama.cpp's convert_hf_to_gguf.py instead")


def _tokenizer_json(model_dir: Path) -> tuple[dict[str, Any], str]:
    """tokenizer.json of `model_dir` and llama.cpp's tokenizer model for it: `gpt2` (byte-level
    BPE: Llama 3, Qwen2, Mistral Nemo, ftlib's tiny models) or `llama` (SentencePiece-style BPE
    with byte fallback: Mistral 7B v0.1-v0.3, Llama 2). Anything else is refused."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"GGUF export needs a fast tokenizer (tokenizer.json) in {model_dir}")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if model.get("type") == "BPE" and not model.get("byte_fallback") and '"ByteLevel"' in pre:
        return tokenizer_json, "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' not in pre:
        return tokenizer_json, "llama"
    raise ValueError(
        f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, Mistral Nemo) and SentencePiece-"
        f"style BPE with byte fallback (Mistral 7B, Llama 2); {model_dir} has a {model.get('type')} tokenizer: "
        "drop export.gguf and convert the merged model with llama.cpp's convert_hf_to_gguf.py")


def _adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (SentencePiece's add_dummy_prefix): a
    Prepend normalizer (Mistral 7B, Llama 2) or a Metaspace pre-tokenizer that prepends."""
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    return bool(re.search(r'"type": "Metaspace"[^}]*"prepend_scheme": "(first|always)"', text))


def check_tokenizer_support(model_dir: Path) -> None:
    """Refuse, before training, a tokenizer that is neither SentencePiece-style BPE nor byte-level
    BPE with a pre-tokenizer llama.cpp implements. Raises ValueError with one line."""
    from transformers import AutoTokenizer

    tokenizer_json, kind = _tokenizer_json(model_dir)
    if kind == "gpt2":
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        _pre_tokenizer_name(tokenizer, tokenizer_json)


def tokenizer_metadata(model_dir: Path, vocab_size: int, chat_template: str | None) -> dict[str, Any]:
    """Everything llama.cpp's `gpt2` or `llama` tokenizer model needs, from the saved HF tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json, kind = _tokenizer_json(model_dir)
    model = tokenizer_json.get("model") or {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer of {model_dir} has ids up to {max(vocab.values())} but the model's "
                         f"vocab_size is {vocab_size}")
    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken

    tokens: list[str] = []
    token_types: list[int] = []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")  # embedding rows beyond the tokenizer (padded vocab)
            token_types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if kind == "llama" and index == tokenizer.unk_token_id:
            token_types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            token_types.append(gguf.TokenType.BYTE)        # byte fallback pieces
        elif index in added:
            if kind == "gpt2" and not added[index].normalized:
                # llama.cpp expects added tokens pre-normalized (the converter's decode(encode()))
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False)) or token
            token_types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            token_types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    scores: list[float] = []
    if kind == "llama":
        # llama.cpp's SentencePiece tokenizer merges, among adjacent pairs whose concatenation is
        # a token, the one whose token scores highest. Scoring each piece by minus the rank of the
        # merge that makes it reproduces BPE's lowest-rank-first order; pieces no merge makes
        # (characters, bytes, specials) are never the result of a pair and score lowest.
        rank = {}
        for r, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), r)
        floor = -float(len(merges) + 1)
        scores = [-float(rank[t]) if t in rank else floor for t in tokens]

    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    special_ids = {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
    }
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp takes the default
        template = template.get("default")
    return {
        "model": kind,
        "pre": _pre_tokenizer_name(tokenizer, tokenizer_json) if kind == "gpt2" else None,
        "tokens": tokens,
        "token_types": token_types,
        "merges": merges if kind == "gpt2" else [],
        "scores": scores,
        "add_space_prefix": kind == "llama" and _adds_space_prefix(tokenizer_json),
        "special_ids": {k: v for k, v in special_ids.items() if v is not None},
        "add_bos": bool(special_ids["bos"] is not None and len(full) > len(plain)
                        and full[0] == special_ids["bos"]),
        "add_eos": bool(special_ids["eos"] is not None and len(full) > len(plain)
                        and full[-1] == special_ids["eos"]),
        "chat_template": template,
    }


def add_tokenizer_metadata(writer, tok: dict[str, Any]) -> None:
    """Write `tok` (tokenizer_metadata's result) to a gguf.GGUFWriter as llama.cpp's keys."""
    writer.add_tokenizer_model(tok["model"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    if tok["model"] == "gpt2":
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_merges(tok["merges"])
    else:   # SentencePiece-style: scores order the merges; "▁" before the text or not
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    ids = tok["special_ids"]
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
