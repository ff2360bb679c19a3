"""GGUF export, read back by independent readers.

Every family (llama, mistral, qwen2) is built as a tiny model into a temporary directory, exported,
and read back with gguf.GGUFReader (metadata, tensor names, types, shapes, the rotary permutation)
and with transformers' GGUF loader (a tokenizer and a model rebuilt from the file alone), whose
token ids and logits must match the original HF model's. When llama-cpp-python is importable,
llama.cpp itself (what Ollama runs) tokenizes and evaluates the file too. K-quants run for real
when llama.cpp's llama-quantize is found (PATH or FTLIB_LLAMA_QUANTIZE).
"""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from ftlib.export import gguf as ggufexp
from ftlib.export import gguf_vocab
from ftlib.templates import NAMED_TEMPLATES
from ftlib.tiny import BUILTIN_MODELS, build_model

# mistral-spm: Mistral 7B's tokenizer kind (SentencePiece-style BPE with byte fallback, llama.cpp's
# `llama` tokenizer model); the others have byte-level BPE tokenizers (llama.cpp's `gpt2`).
FAMILIES = ["llama", "mistral", "qwen2", "mistral-spm"]
TOLERANCE = {"f16": 1e-3, "bf16": 2e-2, "q8_0": 2e-2}
PROMPTS = [
    "Reverse the word. apple",
    "What is the opposite of happy? The opposite of happy is sad.",
    "Add the two numbers. 7 and 12",
]
MESSAGES = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Spell the word with dashes: garden"},
    {"role": "assistant", "content": "g-a-r-d-e-n"},
    {"role": "user", "content": "Repeat the word 3 times: stone"},
]
TOKENIZER_STRINGS = [
    "Reverse the word.",
    "  leading spaces,\ttabs and\n\nnewlines   ",
    "numbers 1 22 333 4444 and punctuation!?... 'quoted' it's",
    "unicode: héllo wörld 🦙 日本語",
    "<s>special</s> tokens <|im_start|>user\nhi<|im_end|>\n<pad><unk>",
]

# Qwen2's own pre-tokenizer (what a real Qwen2 tokenizer.json has); ftlib's tiny tokenizer uses
# GPT-2's. transformers' GGUF loader always gives a qwen2 file Qwen2's split, whatever the file's
# tokenizer.ggml.pre says, while llama.cpp follows tokenizer.ggml.pre. So the qwen2 round trip is
# tested with a Qwen2-style tokenizer (exported as pre "qwen2"), which both readers agree on.
QWEN2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_vocab._QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}


def _build(root: Path, family: str, initializer_range: float = 0.02) -> Path:
    """The builtin tiny model of `family`. Weights use transformers' default init (0.02), the scale
    the tolerances are for: the builtin's 0.1 (chosen so tiny training visibly learns) makes this
    random 2-layer net amplify weight rounding ~10x (f16 ~3e-3, q8_0 ~0.1 on logits of std 0.8);
    test_f32_layout_is_exact covers that scale with an exact comparison instead."""
    key = {"llama": "tiny-llama", "mistral": "tiny-mistral", "qwen2": "tiny-qwen2",
           "mistral-spm": "tiny-mistral-spm"}[family]
    path = build_model(root / key, **BUILTIN_MODELS[key], initializer_range=initializer_range)
    if family == "qwen2":
        tokenizer_file = path / "tokenizer.json"
        data = json.loads(tokenizer_file.read_text())
        data["pre_tokenizer"] = QWEN2_PRE_TOKENIZER
        tokenizer_file.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {family: _build(root, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(family, qtype) -> exported GGUF path, built on first use."""
    out = tmp_path_factory.mktemp("gguf-out")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, qtype: str) -> Path:
        if (family, qtype) not in cache:
            cache[family, qtype] = ggufexp.export_gguf(models[family], out / f"{family}-{qtype}.gguf", qtype)
        return cache[family, qtype]

    return get


def _hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def _from_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, model


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _assert_same_argmax(expected: np.ndarray, got: np.ndarray, text: str) -> None:
    """Same top token at every position whose top-2 margin is larger than the rounding can bridge.

    A random tiny model's logits are flat (std ~0.16 over 512 tokens), so some positions have two
    candidates closer than q8_0's error: those are ties, not predictions. Most positions must be
    decided, so the check is never vacuous."""
    error = np.abs(expected - got).max()
    top2 = np.sort(expected, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * error
    assert decided.mean() >= 0.5, (text, decided.mean())
    assert (expected.argmax(-1) == got.argmax(-1))[decided].all(), text


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _test_texts(tokenizer) -> list[str]:
    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return [*TOKENIZER_STRINGS, chat]


# ------------------------------------------------------------------------------------ metadata


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_metadata_tensor_names_types_and_shapes(models, exported, family, qtype):
    from gguf import GGMLQuantizationType as T

    config = json.loads((models[family] / "config.json").read_text())
    reader = _reader(exported(family, qtype))
    arch = "qwen2" if family == "qwen2" else "llama"  # llama.cpp stores Mistral as llama
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert _field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert _field(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert _field(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert _field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert _field(reader, f"{arch}.vocab_size") == config["vocab_size"]
    assert _field(reader, f"{arch}.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    if arch == "llama":
        assert _field(reader, "llama.rope.dimension_count") == config["hidden_size"] // config["num_attention_heads"]

    per_layer = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    if family == "qwen2":
        per_layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in per_layer}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected

    matrix_type = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[qtype]
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"token_embd.weight": (hidden, vocab), "output.weight": (hidden, vocab),
              "attn_q.weight": (hidden, hidden), "attn_k.weight": (hidden, kv), "attn_v.weight": (hidden, kv),
              "attn_output.weight": (hidden, hidden), "ffn_gate.weight": (hidden, inter),
              "ffn_up.weight": (hidden, inter), "ffn_down.weight": (inter, hidden),
              "attn_q.bias": (hidden,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
              "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,), "output_norm.weight": (hidden,)}
    for name, tensor in tensors.items():
        short = name.split(".", 2)[-1] if name.startswith("blk.") else name
        assert tuple(int(x) for x in tensor.shape) == shapes[short], name  # GGUF order: ne0 first
        if name.endswith("norm.weight") or name.endswith(".bias"):
            assert tensor.tensor_type == T.F32, name
        else:
            assert tensor.tensor_type == matrix_type, name


BYTE_LEVEL = [f for f in FAMILIES if f != "mistral-spm"]


@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_tokenizer_metadata(models, exported, family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[family])
    reader = _reader(exported(family, "f16"))
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("qwen2" if family == "qwen2" else "gpt-2")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == len(vocab)
    assert all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = {vocab[t] for t in ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]}
    assert {i for i, t in enumerate(types) if t == 3} == specials  # CONTROL
    assert all(t == 1 for i, t in enumerate(types) if i not in specials)  # NORMAL
    merges = json.loads((models[family] / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds no BOS
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template == NAMED_TEMPLATES["chatml"]


def test_sentencepiece_tokenizer_metadata(models, exported):
    """Mistral 7B's kind: llama.cpp's `llama` model, scores that order the merges, byte tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["mistral-spm"])
    reader = _reader(exported("mistral-spm", "f16"))
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True        # Mistral's tokenizer adds <s>
    assert "tokenizer.ggml.merges" not in reader.fields and "tokenizer.ggml.pre" not in reader.fields
    vocab = tokenizer.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<unk>"]] == 2                                     # UNKNOWN
    assert {i for i, t in enumerate(types) if t == 3} == {vocab[t] for t in ["<s>", "</s>", "<|im_start|>",
                                                                             "<|im_end|>"]}  # CONTROL
    assert [tokens[i] for i, t in enumerate(types) if t == 6] == [f"<0x{b:02X}>" for b in range(256)]  # BYTE
    scores = _field(reader, "tokenizer.ggml.scores")
    merges = json.loads((models["mistral-spm"] / "tokenizer.json").read_text())["model"]["merges"]
    for rank, merge in enumerate(merges[:50]):
        piece = "".join(merge.split(" ") if isinstance(merge, str) else merge)
        assert scores[vocab[piece]] == pytest.approx(-rank)                # earlier merge, higher score
    assert scores[vocab["<0x41>"]] < -len(merges) and scores[vocab["a"]] < -len(merges)


def test_stock_tiny_qwen2_tokenizer_is_gpt2_pre(tmp_path):
    path = build_model(tmp_path / "q", **BUILTIN_MODELS["tiny-qwen2"])
    out = ggufexp.export_gguf(path, tmp_path / "q.gguf", "f16")
    assert _field(_reader(out), "tokenizer.ggml.pre") == "gpt-2"


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_permutation(models, exported, family):
    """llama/mistral q and k rows are interleaved per head as llama.cpp's converter does; qwen2's are not."""
    from safetensors.numpy import load_file

    config = json.loads((models[family] / "config.json").read_text())
    hf = load_file(str(models[family] / "model.safetensors"))
    tensors = {t.name: t for t in _reader(exported(family, "f16")).tensors}
    for proj, heads in (("q", config["num_attention_heads"]), ("k", config["num_key_value_heads"])):
        original = hf[f"model.layers.0.self_attn.{proj}_proj.weight"]
        stored = np.asarray(tensors[f"blk.0.attn_{proj}.weight"].data, dtype=np.float32)
        permuted = (original.reshape(heads, 2, original.shape[0] // heads // 2, -1)
                    .swapaxes(1, 2).reshape(original.shape))
        expected = original if family == "qwen2" else permuted
        np.testing.assert_allclose(stored, expected, atol=1e-3)
        assert not np.allclose(permuted, original, atol=1e-3)  # the check can tell them apart


# ------------------------------------------------------------------------- transformers round trip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "bf16"])
def test_transformers_reads_back_tokenizer_and_logits(models, exported, family, qtype):
    tokenizer, model = _hf(models[family])
    gguf_tokenizer, gguf_model = _from_gguf(exported(family, qtype))

    texts = _test_texts(tokenizer)
    if family == "mistral-spm":
        # transformers rebuilds a SentencePiece tokenizer from the GGUF without the "legacy" extra
        # "▁" that Mistral's tokenizer.json puts after special tokens and before leading spaces;
        # llama.cpp, what Ollama runs, matches training on every string (test_llama_cpp_reads_back).
        texts = [t for t in texts if not t[:1].isspace() and "<s>" not in t and "<|im_start|>" not in t]
        assert len(texts) == 3
    for text in texts:
        assert gguf_tokenizer.encode(text, add_special_tokens=True) == tokenizer.encode(text), text
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == tokenizer.eos_token and gguf_tokenizer.bos_token == tokenizer.bos_token

    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for text in [*PROMPTS, chat]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected, got = _logits(model, ids), _logits(gguf_model, ids)
        assert np.abs(expected - got).max() < TOLERANCE[qtype], text
        _assert_same_argmax(expected, got, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_layout_is_exact(tmp_path, family):
    """Without rounding (an internal f32 file) the GGUF reproduces the model bit for bit: names,
    permutation, biases and metadata are exactly right, at the builtin's own weight scale."""
    path = _build(tmp_path, family, initializer_range=0.1)
    out = tmp_path / "m-f32.gguf"
    ggufexp._write_gguf(path, out, "f32", None, None)
    tokenizer, model = _hf(path)
    _, gguf_model = _from_gguf(out)
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert np.abs(_logits(model, ids) - _logits(gguf_model, ids)).max() < 1e-5, text


# ------------------------------------------------------------------------------ llama.cpp itself


def _llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return llama_cpp


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "bf16"])
def test_llama_cpp_reads_back(models, exported, family, qtype):
    """llama.cpp (what Ollama runs): same token ids as training, same logits within the tolerance
    (measured: f16 3.7e-4, bf16 3.3e-3, q8_0 1.0e-2)."""
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed (optional: CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF' "
                    "pip install llama-cpp-python==0.3.36, ~5 min build) - transformers' reader still ran")
    tokenizer, model = _hf(models[family])
    llm = llama_cpp.Llama(model_path=str(exported(family, qtype)), n_ctx=256, logits_all=True,
                          n_threads=2, verbose=False)
    for text in _test_texts(tokenizer):
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == tokenizer.encode(text, add_special_tokens=False), text
    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for text in [*PROMPTS, chat]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        expected = _logits(model, ids)
        assert np.abs(expected - got).max() < TOLERANCE[qtype], text
        _assert_same_argmax(expected, got, text)


# ------------------------------------------------------------------------------------ K-quants


@pytest.fixture(scope="module")
def model_256(tmp_path_factory) -> Path:
    """Widths that are multiples of 256, so llama.cpp builds real K-quant blocks (no fallback)."""
    return build_model(tmp_path_factory.mktemp("m256") / "tiny-llama-256", **BUILTIN_MODELS["tiny-llama-256"],
                       initializer_range=0.02)


# Measured logit cosine to the HF model: q4_k_m 0.988, q5_k_m 0.997, q6_k 0.999 (q8_0 0.9999).
@pytest.mark.parametrize("qtype,main,min_cosine", [("q4_k_m", "Q4_K", 0.98), ("q5_k_m", "Q5_K", 0.99),
                                                   ("q6_k", "Q6_K", 0.995)])
def test_k_quants_with_llama_quantize(model_256, tmp_path, qtype, main, min_cosine):
    from gguf import GGMLQuantizationType as T

    binary = ggufexp.find_llama_quantize()
    if binary is None:
        pytest.skip("llama.cpp's llama-quantize not found: build it with `containers/build-llama-cpp.sh PREFIX` "
                    "(cmake, g++; ~3 min) and put PREFIX/bin on PATH or set FTLIB_LLAMA_QUANTIZE")
    out = ggufexp.export_gguf(model_256, tmp_path / "gguf" / f"m-{qtype}.gguf", qtype)
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp left
    reader = _reader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    k_types = {T.Q4_K, T.Q5_K, T.Q6_K}
    for name, kind in types.items():
        if name.endswith("norm.weight"):
            assert kind == T.F32, name
        else:
            assert kind in k_types, (name, kind.name)  # no silent fallback to q5_0/q8_0
    assert T[main] in set(types.values())
    assert ggufexp.k_quant_fallbacks(out) == {}
    assert _field(reader, "general.file_type") == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[qtype]

    # transformers dequantizes K-quants in numpy: the model loads and predicts like the original
    tokenizer, model = _hf(model_256)
    gguf_tokenizer, gguf_model = _from_gguf(out)
    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert gguf_tokenizer.encode(chat) == tokenizer.encode(chat)
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected, got = _logits(model, ids), _logits(gguf_model, ids)
        cosine = (expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got)
        assert cosine > min_cosine, (text, cosine)
    llama_cpp = _llama_cpp()
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False)
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tokenizer.encode(chat)


def test_k_quant_of_narrow_model_warns_about_fallback(models, tmp_path, caplog):
    """Rows of 64 cannot hold 256-wide K-quant blocks: llama.cpp demotes them, ftlib says so."""
    if ggufexp.find_llama_quantize() is None:
        pytest.skip("llama.cpp's llama-quantize not found: build it with `containers/build-llama-cpp.sh PREFIX`")
    with caplog.at_level("WARNING", logger="ftlib.export.gguf"):
        out = ggufexp.export_gguf(models["llama"], tmp_path / "m-q4_k_m.gguf", "q4_k_m")
    fallbacks = ggufexp.k_quant_fallbacks(out)
    assert fallbacks and set(fallbacks.values()) <= {"Q5_0", "Q5_1", "Q8_0", "F16"}
    assert "not multiples of 256" in caplog.text


def _fake_quantizer(path: Path, script: str) -> Path:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_k_quant_pipeline_calls_the_quantizer(models, tmp_path, monkeypatch):
    """The plumbing around llama-quantize, with a stand-in that records its arguments."""
    log = tmp_path / "args.txt"
    fake = _fake_quantizer(tmp_path / "llama-quantize", f'echo "$@" > {log}; cp "$1" "$2"')
    monkeypatch.setenv("FTLIB_LLAMA_QUANTIZE", str(fake))
    ggufexp.check_gguf_types(["q4_k_m", "q8_0"])
    out = ggufexp.export_gguf(models["llama"], tmp_path / "gguf" / "m.gguf", "Q4_K_M", threads=2)
    src, dst, kind, threads = log.read_text().split()
    assert kind == "Q4_K_M" and threads == "2" and Path(src).parent == out.parent == Path(dst).parent
    assert not Path(src).exists() and not Path(dst).exists()  # the f16 intermediate is gone
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]
    assert _field(_reader(out), "general.architecture") == "llama"


def test_failing_quantizer_leaves_nothing(models, tmp_path, monkeypatch):
    fake = _fake_quantizer(tmp_path / "llama-quantize", 'head -c 100 "$1" > "$2"; echo "boom: disk full" >&2; exit 3')
    monkeypatch.setenv("FTLIB_LLAMA_QUANTIZE", str(fake))
    out_dir = tmp_path / "gguf"
    with pytest.raises(RuntimeError, match="boom: disk full"):
        ggufexp.export_gguf(models["llama"], out_dir / "m-q6_k.gguf", "q6_k")
    assert list(out_dir.iterdir()) == []


# -------------------------------------------------------------------------------- type checking


@pytest.fixture
def no_quantizer(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.delenv("FTLIB_LLAMA_QUANTIZE", raising=False)
    assert ggufexp.find_llama_quantize() is None


def test_quantizer_is_found_beside_the_running_python(no_quantizer, tmp_path, monkeypatch):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    assert ggufexp.find_llama_quantize() is None
    binary = venv_bin / "llama-quantize"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    assert ggufexp.find_llama_quantize() == str(binary.resolve())


def test_check_gguf_types_refuses_k_quant_without_quantizer(no_quantizer):
    ggufexp.check_gguf_types(["f16", "bf16", "q8_0", "Q8_0"])  # numpy types need nothing
    with pytest.raises(ValueError) as info:
        ggufexp.check_gguf_types(["q8_0", "q4_k_m"])
    message = str(info.value)
    assert "\n" not in message
    for part in ("q4_k_m", "llama-quantize", "containers/build-llama-cpp.sh", "FTLIB_LLAMA_QUANTIZE",
                 "container image", "PATH"):
        assert part in message, part


def test_check_gguf_types_names_a_bad_quantizer_setting(tmp_path, monkeypatch):
    not_executable = tmp_path / "llama-quantize"
    not_executable.write_text("")
    monkeypatch.setenv("FTLIB_LLAMA_QUANTIZE", str(not_executable))
    with pytest.raises(ValueError, match=f"FTLIB_LLAMA_QUANTIZE={not_executable} is not an executable"):
        ggufexp.check_gguf_types("q5_k_m")


def test_check_gguf_types_refuses_unknown_types():
    with pytest.raises(ValueError) as info:
        ggufexp.check_gguf_types(["q8_0", "q4_km"])
    message = str(info.value)
    assert "\n" not in message and "'q4_km'" in message
    assert "f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k" in message


def test_export_refuses_k_quant_without_quantizer_before_writing(models, tmp_path, no_quantizer):
    with pytest.raises(ValueError, match="llama-quantize"):
        ggufexp.export_gguf(models["llama"], tmp_path / "out" / "m.gguf", "q4_k_m")
    assert not (tmp_path / "out").exists()


def test_export_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        ggufexp.export_gguf(tmp_path, tmp_path / "m.gguf", "f16")


# ----------------------------------------------------------------------------------- atomicity


def test_interrupted_export_leaves_no_file(models, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "gguf" / "m-q8_0.gguf"
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed midway")  # also what a signal looks like
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(KeyboardInterrupt):
        ggufexp.export_gguf(models["llama"], out, "q8_0")
    assert calls["n"] == 4
    assert list(out.parent.iterdir()) == []  # neither the final file nor a temporary one


def test_interrupted_export_keeps_the_previous_file(models, tmp_path, monkeypatch):
    import gguf

    out = ggufexp.export_gguf(models["llama"], tmp_path / "m.gguf", "f16")
    before = out.read_bytes()

    def failing(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="disk full"):
        ggufexp.export_gguf(models["llama"], out, "q8_0")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix in (".gguf", ".tmp")] == ["m.gguf"]


# ------------------------------------------------------------------------- model variants


def test_tied_embeddings_write_no_output_tensor(models, tmp_path):
    """Small Qwen2 models tie lm_head to the embeddings: llama.cpp then reuses token_embd."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied = tmp_path / "tied"
    model.save_pretrained(tied)
    AutoTokenizer.from_pretrained(models["qwen2"]).save_pretrained(tied)

    out = ggufexp.export_gguf(tied, tmp_path / "tied-f16.gguf", "f16")
    names = {t.name for t in _reader(out).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    tokenizer, reference = _hf(tied)
    _, gguf_model = _from_gguf(out)
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=2,
                          verbose=False) if llama_cpp else None
    for text in PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        expected = _logits(reference, ids)
        assert np.abs(expected - _logits(gguf_model, ids)).max() < TOLERANCE["f16"], text
        if llm is not None:
            llm.reset()
            llm.eval(ids)
            assert np.abs(expected - np.asarray(llm.scores[: len(ids)])).max() < TOLERANCE["f16"], text


def _llama3_rope_export(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(unscaled model, the same with Llama 3.1-style rope scaling, its f32 GGUF).

    Built at the builtin's weight scale (0.1), where attention is sharp enough for positions to
    matter, and written unrounded (f32) so llama.cpp must match closely."""
    original = _build(tmp_path / "plain", "llama", initializer_range=0.1)
    path = _build(tmp_path / "scaled", "llama", initializer_range=0.1)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}
    (path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "rope-f32.gguf"
    ggufexp._write_gguf(path, out, "f32", None, None)
    return original, path, out


def test_llama3_rope_scaling_is_stored_as_rope_freqs(tmp_path):
    """llama.cpp reads Llama 3.1's per-frequency rope factors from a `rope_freqs` tensor."""
    _, path, out = _llama3_rope_export(tmp_path)
    config = json.loads((path / "config.json").read_text())
    # transformers' own llama3 frequencies, divided into the unscaled ones, are the factors
    _, model = _hf(path)
    dim = config["hidden_size"] // config["num_attention_heads"]
    plain = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaled = model.model.rotary_emb.inv_freq.double().numpy()
    stored = {t.name: t for t in _reader(out).tensors}["rope_freqs.weight"]
    assert stored.tensor_type.name == "F32"
    np.testing.assert_allclose(np.asarray(stored.data), plain / scaled, rtol=1e-5)
    assert len(set(np.round(plain / scaled, 4))) > 2  # the check covers all three regimes


def test_llama3_rope_scaling_in_llama_cpp(tmp_path):
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        pytest.skip("llama-cpp-python is not installed (test_llama3_rope_scaling_is_stored_as_rope_freqs "
                    "checked the factors; this checks llama.cpp's use of them)")
    original, path, out = _llama3_rope_export(tmp_path)
    tokenizer, model = _hf(path)
    _, unscaled = _hf(original)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)  # long enough for the scaling to show
    llm.reset()
    llm.eval(ids)
    expected, got = _logits(model, ids), np.asarray(llm.scores[: len(ids)])
    error, effect = np.abs(expected - got).max(), np.abs(expected - _logits(unscaled, ids)).max()
    # measured: error 1.8e-3 (llama.cpp keeps its KV cache in f16), effect 2.1
    assert error < 1e-2 and effect > 100 * error, (error, effect)


def test_check_gguf_support(models, tmp_path):
    for family in FAMILIES:
        ggufexp.check_gguf_support(models[family])
    # byte fallback on a byte-level BPE: neither llama.cpp tokenizer model fits it
    import shutil

    spm = tmp_path / "spm"
    shutil.copytree(models["llama"], spm)
    data = json.loads((spm / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        ggufexp.check_gguf_support(spm)
    assert "\n" not in str(info.value) and "SentencePiece" in str(info.value)
    with pytest.raises(ValueError, match="SentencePiece"):
        ggufexp.export_gguf(spm, tmp_path / "out" / "m.gguf", "f16")
    assert list((tmp_path / "out").iterdir()) == []
    # a byte-level BPE whose pre-tokenizer llama.cpp does not implement
    odd = tmp_path / "odd"
    shutil.copytree(models["llama"], odd)
    data = json.loads((odd / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True
    (odd / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        ggufexp.check_gguf_support(odd)
