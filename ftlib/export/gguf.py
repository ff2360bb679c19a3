"""Export a merged Hugging Face model directory to one GGUF file (llama.cpp, Ollama).

    export_gguf("run/artifacts/merged", "run/artifacts/gguf/model-q8_0.gguf", "q8_0")

One idea, read top to bottom: an HF safetensors directory -> one GGUF file. The types and the
quantizer first, then the model (config, tensor plan), then writing (metadata, tensors, the
atomic rename, llama-quantize) and export_gguf last. The tokenizer's part of the file
(tokenizer.ggml.*, the chat template) comes from ftlib.export.gguf_vocab.

The merged directory is `save_pretrained` output (config.json, *.safetensors, tokenizer files).
Supported families: llama, mistral (written as llama.cpp's `llama` architecture, as llama.cpp's
own converter does) and qwen2. The file follows llama.cpp's converter (convert_hf_to_gguf.py):
metadata under the architecture's keys (`llama.*` or `qwen2.*`), llama.cpp tensor names
(token_embd, blk.N.attn_q, ..., output_norm, output), norms and biases in F32, the q/k rotary
permutation for llama/mistral (llama.cpp's RoPE pairs adjacent dimensions, HF pairs halves),
qwen2's q/k/v biases, and llama3-style rope factors as `rope_freqs`; the tokenizer as
gguf_vocab writes it (byte-level BPE or SentencePiece-style BPE with byte fallback). Other
families and tokenizers are refused with a one-line error; `check_gguf_support(base_model_dir)`
finds that out before training.

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
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..storage import fsync_dir
from .gguf_vocab import add_tokenizer_metadata, check_tokenizer_support, tokenizer_metadata

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


def check_gguf_support(model_dir: str | os.PathLike) -> None:
    """Refuse, before training, a base model this module cannot export: a family other than
    llama/mistral/qwen2, or a tokenizer that is neither SentencePiece-style BPE nor byte-level
    BPE with a pre-tokenizer llama.cpp implements. Raises ValueError with one line.
    `model_dir`: a local HF model directory."""
    model_dir = Path(model_dir)
    _read_config(model_dir)
    check_tokenizer_support(model_dir)


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

    add_tokenizer_metadata(writer, tok)


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
    tok = tokenizer_metadata(model_dir, config["vocab_size"], chat_template)
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
