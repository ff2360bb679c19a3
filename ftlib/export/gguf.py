"""Export a merged Hugging Face model directory to GGUF (llama.cpp, Ollama).

    export_gguf("run/artifacts/merged", "run/artifacts/gguf/model-q8_0.gguf", "q8_0")

The merged directory is `save_pretrained` output (config.json, *.safetensors, tokenizer files).
Supported families: llama, mistral (written as llama.cpp's `llama` architecture, as llama.cpp's
own converter does) and qwen2. The file follows llama.cpp's converter (convert_hf_to_gguf.py):

- metadata under the architecture's keys (`llama.*` or `qwen2.*`), llama.cpp tensor names
  (token_embd, blk.N.attn_q, ..., output_norm, output), norms and biases in F32, the q/k rotary
  permutation for llama/mistral (llama.cpp's RoPE pairs adjacent dimensions, HF pairs halves),
  qwen2's q/k/v biases, and llama3-style rope factors as `rope_freqs`;
- the tokenizer: byte-level BPE (Llama 3, Qwen2, Mistral Nemo) as llama.cpp's `gpt2` model
  (tokens, token types, merges, the pre-tokenizer name `tokenizer.ggml.pre`); SentencePiece-style
  BPE with byte fallback (Mistral 7B v0.1-v0.3, Llama 2) as llama.cpp's `llama` model (tokens,
  scores that order the merges, byte/control/unknown token types, add_space_prefix); for both,
  bos/eos/pad/unk ids, add_bos/add_eos and the chat template. Other tokenizers are refused with a
  one-line error; `check_gguf_support(base_model_dir)` finds that out before training.

Types: f16, bf16 and q8_0 are written here with the `gguf` package (numpy). The K-quants q4_k_m,
q5_k_m and q6_k need llama.cpp's quantizer: an f16 (bf16 for bf16 sources) GGUF is written first
and `llama-quantize` (on PATH, or FTLIB_LLAMA_QUANTIZE) turns it into the final file. ftlib calls
`check_gguf_types` before training, so a missing quantizer fails the run at submit time, not
after hours of training.

Tensors are streamed one at a time (header and tensor infos first, then each tensor's data), so
memory stays at one tensor, not the model. Every output appears atomically: it is written under
a temporary name in the target directory, fsynced, and renamed; a failure leaves no file at the
final path (and no temporary file behind).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..storage import fsync_dir

log = logging.getLogger(__name__)

#: Types written with numpy (the `gguf` package).
NUMPY_TYPES = ("f16", "bf16", "q8_0")
#: K-quants: ftlib name -> llama-quantize's type name.
K_QUANT_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
GGUF_TYPES = (*NUMPY_TYPES, *K_QUANT_TYPES)

QUANTIZE_ENV = "FTLIB_LLAMA_QUANTIZE"
QUANTIZE_BINARY = "llama-quantize"

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")

# What to tell a user who asked for a K-quant without a quantizer. One line, every way out.
_HOW_TO_GET_QUANTIZE = (
    f"build it with `containers/build-llama-cpp.sh PREFIX` (needs cmake and g++) and put PREFIX/bin "
    f"on PATH or set {QUANTIZE_ENV}=PREFIX/bin/{QUANTIZE_BINARY}, or run in ftlib's container image "
    f"(it ships {QUANTIZE_BINARY}), or export only {', '.join(NUMPY_TYPES)} (they need nothing)"
)

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


# --------------------------------------------------------------------------------------------
# Types and the quantizer
# --------------------------------------------------------------------------------------------

def normalize_type(qtype: str) -> str:
    """`Q4_K_M` / ` q4_k_m ` -> `q4_k_m`; unknown types raise ValueError naming the valid ones."""
    name = str(qtype).strip().lower()
    if name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; valid types: {', '.join(GGUF_TYPES)}")
    return name


def find_llama_quantize() -> str | None:
    """Path of llama.cpp's `llama-quantize`: $FTLIB_LLAMA_QUANTIZE if set (a path or a command
    name), else `llama-quantize` on PATH, else beside the running python (installed into the
    virtual environment: `containers/build-llama-cpp.sh .venv`); None when none is an executable."""
    configured = os.environ.get(QUANTIZE_ENV, "").strip()
    if configured:
        found = shutil.which(configured)
        return str(Path(found).resolve()) if found else None
    # The venv's bin directory is not on PATH when ftlib runs as .venv/bin/python (no activate);
    # sys.executable is not resolved: a venv's python is a symlink out of the venv.
    found = shutil.which(QUANTIZE_BINARY) or shutil.which(QUANTIZE_BINARY, path=str(Path(sys.executable).parent))
    return str(Path(found).resolve()) if found else None


def check_gguf_types(types: str | Iterable[str]) -> None:
    """Refuse, before anything runs, GGUF types this machine cannot produce.

    Raises ValueError with one line: an unknown type (with the valid list), or a K-quant when no
    `llama-quantize` is found (with how to get one)."""
    if isinstance(types, str):
        types = [types]
    names = [normalize_type(t) for t in types]
    k_quants = [n for n in names if n in K_QUANT_TYPES]
    if k_quants and find_llama_quantize() is None:
        configured = os.environ.get(QUANTIZE_ENV, "").strip()
        where = (f"{QUANTIZE_ENV}={configured} is not an executable file" if configured
                 else f"no {QUANTIZE_BINARY} on PATH and {QUANTIZE_ENV} is not set")
        raise ValueError(
            f"GGUF type {', '.join(k_quants)} needs llama.cpp's {QUANTIZE_BINARY} ({where}): "
            f"{_HOW_TO_GET_QUANTIZE}")


# --------------------------------------------------------------------------------------------
# Model: config, tensors
# --------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """One tensor of the output file: its name, numpy shape, type and how to produce its data."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        import gguf

        if self.qtype == gguf.GGMLQuantizationType.F32:
            return 4 * math.prod(self.shape)
        if self.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            return 2 * math.prod(self.shape)
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))

    def data(self) -> np.ndarray:
        import gguf

        array = np.ascontiguousarray(self.load(), dtype=np.float32)
        assert array.shape == self.shape, (self.name, array.shape, self.shape)
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return array
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return array.astype(np.float16)
        return gguf.quants.quantize(array, self.qtype)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = json.loads(path.read_text())
    if "text_config" in config and "hidden_size" not in config:
        config = {**config, **config["text_config"]}
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"GGUF export supports model types {', '.join(SUPPORTED_FAMILIES)}; "
                         f"{model_dir} is {family!r}")
    return config


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = dict(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    return params


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (LlamaModel.permute): HF rotates halves of each head,
    llama.cpp rotates adjacent pairs, so rows are interleaved per head."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(params: dict[str, Any], dim: int) -> np.ndarray:
    """Per-frequency factors for rope_type llama3 (Llama 3.1+), as llama.cpp stores them."""
    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_len = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


class _SafetensorsSource:
    """Lazy access to every tensor in a directory's *.safetensors files (sharded or not)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir} has no *.safetensors files (save the merged model "
                                    "with save_pretrained(safe_serialization=True))")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():
                self.where[key] = handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        import torch

        return self.where[name].get_tensor(name).to(torch.float32).numpy()


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str):
    """The GGML type of one tensor for output type `qtype` (f16/bf16/q8_0), as llama.cpp's
    converter chooses: 1-D tensors (norms, biases, rope factors) stay F32."""
    from gguf import GGMLQuantizationType as T

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or qtype == "f32":
        return T.F32
    if qtype == "bf16":
        return T.BF16
    if qtype == "q8_0":
        block = 32
        return T.Q8_0 if shape[-1] % block == 0 else T.F16  # rows must be whole blocks
    return T.F16


def _plan_tensors(model_dir: Path, config: dict[str, Any], qtype: str, arch) -> list[_Plan]:
    import gguf

    family = config["model_type"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    source = _SafetensorsSource(model_dir)
    permute = family in ("llama", "mistral")

    plans: list[_Plan] = []
    for hf_name in source.where:
        if hf_name.endswith(".rotary_emb.inv_freq") or ".rotary_emb." in hf_name:
            continue  # recomputed by every runtime
        base, dot, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = hf_name, ""
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise ValueError(f"GGUF export: tensor {hf_name!r} of {model_dir} has no llama.cpp name for "
                             f"{family} (is this a merged model, without adapter or extra heads?)")
        gguf_name = f"{gguf_base}.{suffix}" if suffix else gguf_base
        shape = source.shape(hf_name)

        def load(hf_name: str = hf_name) -> np.ndarray:
            array = source.load(hf_name)
            if permute and re.search(r"\.q_proj\.(weight|bias)$", hf_name):
                array = _permute_qk(array, n_head)
            elif permute and re.search(r"\.k_proj\.(weight|bias)$", hf_name):
                array = _permute_qk(array, n_kv)
            return array

        plans.append(_Plan(gguf_name, shape, _tensor_type(gguf_name, shape, qtype), load))

    rope = _rope_parameters(config)
    if permute and str(rope.get("rope_type", "")).lower() == "llama3":
        factors = _llama3_rope_factors(rope, _head_dim(config))
        plans.append(_Plan("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32,
                           lambda factors=factors: factors))

    def order(plan: _Plan) -> tuple:
        match = re.match(r"blk\.(\d+)\.", plan.name)
        if plan.name.startswith("token_embd"):
            return (0, 0, plan.name)
        if plan.name.startswith("rope_freqs"):
            return (1, 0, plan.name)
        if match:
            return (2, int(match.group(1)), plan.name)
        return (3, 0, plan.name)

    return sorted(plans, key=order)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

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


def check_gguf_support(model_dir: str | os.PathLike) -> None:
    """Refuse, before training, a base model this module cannot export: a family other than
    llama/mistral/qwen2, or a tokenizer that is neither SentencePiece-style BPE nor byte-level
    BPE with a pre-tokenizer llama.cpp implements. Raises ValueError with one line.
    `model_dir`: a local HF model directory."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    _read_config(model_dir)
    tokenizer_json, kind = _tokenizer_json(model_dir)
    if kind == "gpt2":
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        _pre_tokenizer_name(tokenizer, tokenizer_json)


def _tokenizer_metadata(model_dir: Path, vocab_size: int, chat_template: str | None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _add_metadata(writer, config: dict[str, Any], tok: dict[str, Any], name: str, file_type) -> None:
    import gguf

    family = config["model_type"]
    rope = _rope_parameters(config)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if family in ("llama", "mistral"):
        writer.add_rope_dimension_count(_head_dim(config))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])

    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type == "linear" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type == "llama3" and family in ("llama", "mistral"):
        pass  # rope_freqs tensor
    elif rope_type != "default":
        raise ValueError(f"GGUF export: rope_type {rope_type!r} of this {family} model is not supported")

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


def _temp_path(final: Path, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{tag}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _write_gguf(model_dir: Path, path: Path, qtype: str, name: str | None,
                chat_template: str | None, add_bos: bool | None = None) -> None:
    """Write a GGUF of numpy type `qtype` (f16/bf16/q8_0) to `path` (not atomic by itself)."""
    import gguf

    config = _read_config(model_dir)
    family = config["model_type"]
    arch = gguf.MODEL_ARCH.QWEN2 if family == "qwen2" else gguf.MODEL_ARCH.LLAMA
    tok = _tokenizer_metadata(model_dir, config["vocab_size"], chat_template)
    if add_bos is not None:
        tok["add_bos"] = bool(add_bos)
    plans = _plan_tensors(model_dir, config, qtype, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    try:
        # Not plain "mistral": transformers 5.23 maps general.name == "mistral" to a GGUF
        # architecture that gguf-py lacks and fails; llama.cpp and Ollama ignore the name.
        _add_metadata(writer, config, tok, name or f"ftlib-{family}", file_type)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.float32, plan.nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(plan.data())
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        writer.close()


def _run_quantize(binary: str, src: Path, dst: Path, ktype: str, threads: int | None) -> None:
    command = [binary, str(src), str(dst), K_QUANT_TYPES[ktype]]
    if threads:
        command.append(str(threads))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} failed with exit status {result.returncode}: {tail}")
    fallbacks = k_quant_fallbacks(dst)
    if fallbacks:
        log.warning("GGUF %s: %d of the matrices have rows that are not multiples of 256, so llama-quantize "
                    "stored them as %s instead of K-quant blocks", ktype, len(fallbacks),
                    ", ".join(sorted(set(fallbacks.values()))))


def k_quant_fallbacks(path: str | os.PathLike) -> dict[str, str]:
    """Matrices of a K-quant GGUF that llama-quantize did not store as K-quants (name -> type).

    K-quant blocks are 256 wide; llama.cpp silently demotes rows of other widths (q4_K -> q5_0,
    q6_K -> q8_0, ...), so a model with hidden size 64 gets no K-quant at all."""
    from gguf import GGMLQuantizationType as T, GGUFReader

    k_types = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K}
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors
            if len(t.shape) >= 2 and t.tensor_type not in k_types}


def export_gguf(merged_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "f16", *,
                name: str | None = None, chat_template: str | None = None, add_bos: bool | None = None,
                quantize_binary: str | None = None, threads: int | None = None) -> Path:
    """Convert the merged HF model in `merged_dir` to a GGUF file at `out_path`, atomically.

    qtype: one of f16, bf16, q8_0 (written here) or q4_k_m, q5_k_m, q6_k (llama-quantize).
    name: general.name (default "ftlib-<model type>"; the run name is a good choice).
    chat_template: embedded instead of the tokenizer's own (e.g. the named template used in training).
    add_bos: tokenizer.ggml.add_bos_token, i.e. whether llama.cpp/Ollama prepend BOS to a prompt;
        default: what the tokenizer does with add_special_tokens=True. Chat training that tokenizes
        the rendered template with add_special_tokens=False matches add_bos=False exactly.
    quantize_binary: llama-quantize to use (default: find_llama_quantize()).
    threads: llama-quantize threads (default: its own choice).
    Returns the final path. On any failure nothing is left at `out_path` or beside it."""
    qtype = normalize_type(qtype)
    merged_dir, final = Path(merged_dir), Path(out_path)
    binary = None
    if qtype in K_QUANT_TYPES:
        binary = quantize_binary or find_llama_quantize()
        if binary is None:
            check_gguf_types([qtype])  # raises the one-line how-to
    _read_config(merged_dir)  # refuse an unsupported model before creating anything
    final.parent.mkdir(parents=True, exist_ok=True)

    temps: list[Path] = []
    try:
        if binary is None:
            tmp = _temp_path(final, qtype)
            temps.append(tmp)
            _write_gguf(merged_dir, tmp, qtype, name, chat_template, add_bos)
        else:
            config = _read_config(merged_dir)
            source_dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
            base_type = "bf16" if source_dtype == "bfloat16" else "f16"
            base = _temp_path(final, base_type)
            temps.append(base)
            _write_gguf(merged_dir, base, base_type, name, chat_template, add_bos)
            tmp = _temp_path(final, qtype)
            temps.append(tmp)
            _run_quantize(binary, base, tmp, qtype, threads)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
        temps.remove(tmp)
        fsync_dir(final.parent)
        return final
    finally:
        for leftover in temps:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
