"""A model's shape and parameter counts, from its HF config alone: the sizes every other preflight
module computes with. Also the package's error type, the byte sizes of dtypes and ``GiB``."""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

GiB = 1024 ** 3


class PreflightError(ValueError):
    """A run that cannot work as configured (does not fit, unknown GPU, bad argument)."""


DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2,
               "float16": 2, "fp16": 2, "half": 2}

# The decoder's linear layers as peft names them; "all-linear" means all of these (peft's
# "all-linear" excludes the output layer lm_head).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Shape = tuple[int, ...]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name ("bfloat16", "torch.float32", "fp16" ...)."""
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise PreflightError(f"unknown compute dtype {dtype!r}; use bfloat16, float16 or float32")
    return DTYPE_BYTES[key]


def numel(shape: Shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}

    def bias_params_per_layer(self) -> int:
        n = 0
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            n += self.hidden_size
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        return n


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def model_shape(model_cfg: Any) -> ModelShape:
    """A ModelShape from a config.json dict, a PretrainedConfig, a ModelShape, or a path to a
    config.json or to a model directory holding one."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    if isinstance(model_cfg, (str, Path)):
        path = Path(model_cfg)
        if path.is_dir():
            path = path / "config.json"
        model_cfg = json.loads(path.read_text())
    if _cfg_get(model_cfg, "text_config") is not None and _cfg_get(model_cfg, "hidden_size") is None:
        model_cfg = _cfg_get(model_cfg, "text_config")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if _cfg_get(model_cfg, k) is None]
    if missing:
        raise PreflightError(f"model config lacks {', '.join(missing)}")
    h = int(_cfg_get(model_cfg, "hidden_size"))
    heads = int(_cfg_get(model_cfg, "num_attention_heads"))
    model_type = str(_cfg_get(model_cfg, "model_type", ""))
    attention_bias = bool(_cfg_get(model_cfg, "attention_bias", False))
    return ModelShape(
        hidden_size=h,
        intermediate_size=int(_cfg_get(model_cfg, "intermediate_size")),
        num_hidden_layers=int(_cfg_get(model_cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(_cfg_get(model_cfg, "num_key_value_heads", heads)),
        head_dim=int(_cfg_get(model_cfg, "head_dim", h // heads)),
        vocab_size=int(_cfg_get(model_cfg, "vocab_size")),
        tie_word_embeddings=bool(_cfg_get(model_cfg, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama/Mistral have them only with attention_bias.
        qkv_bias=attention_bias or model_type in ("qwen2", "qwen2_moe"),
        o_bias=attention_bias,
        mlp_bias=bool(_cfg_get(model_cfg, "mlp_bias", False)),
    )


def count_params(model_cfg: Any) -> dict[str, int]:
    """Parameter counts by kind; ``total`` is what ``model.num_parameters()`` reports."""
    s = model_shape(model_cfg)
    L = s.num_hidden_layers
    embed = s.vocab_size * s.hidden_size
    lm_head = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
    linear = L * sum(i * o for i, o in s.linear_shapes().values())
    norms = L * 2 * s.hidden_size + s.hidden_size        # input/post-attention norm per layer + final
    bias = L * s.bias_params_per_layer()
    return {"embed": embed, "lm_head": lm_head, "linear": linear, "norms": norms, "bias": bias,
            "total": embed + lm_head + linear + norms + bias}


def param_shapes(s: ModelShape) -> list[Shape]:
    """Every parameter tensor of the model, the input embedding first."""
    out: list[Shape] = [(s.vocab_size, s.hidden_size)]
    if not s.tie_word_embeddings:
        out.append((s.vocab_size, s.hidden_size))
    h, q, kv, i = s.hidden_size, s.q_dim, s.kv_dim, s.intermediate_size
    for _ in range(s.num_hidden_layers):
        out += [(fo, fi) for fi, fo in s.linear_shapes().values()] + [(h,), (h,)]
        out += [(q,), (kv,), (kv,)] if s.qkv_bias else []
        out += [(h,)] if s.o_bias else []
        out += [(i,), (i,), (h,)] if s.mlp_bias else []
    out.append((h,))
    return out


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

def lora_targets(lora_target_modules: str | Sequence[str] | None) -> tuple[str, ...]:
    """The targeted module names, in LINEAR_MODULES order (then lm_head); "all-linear" or None
    means LINEAR_MODULES. Raises PreflightError, with the nearest name, for an unknown one."""
    if lora_target_modules is None or lora_target_modules == "all-linear":
        return LINEAR_MODULES
    if isinstance(lora_target_modules, str):
        names = [n.strip() for n in lora_target_modules.split(",") if n.strip()]
    else:
        names = list(lora_target_modules)
    known = LINEAR_MODULES + ("lm_head",)
    for name in names:
        if name == "all-linear":
            return LINEAR_MODULES
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise PreflightError(f"unknown LoRA target module {name!r}{hint}; "
                                 f"known: all-linear, {', '.join(known)}")
    return tuple(n for n in known if n in names)


def lora_shapes(s: ModelShape, r: int, targets: Sequence[str]) -> list[Shape]:
    """Every LoRA tensor: lora_A.weight is (r, in), lora_B.weight is (out, r) per targeted linear."""
    shapes = s.linear_shapes()
    out: list[Shape] = []
    for _ in range(s.num_hidden_layers):
        for name in targets:
            if name in shapes:
                fin, fout = shapes[name]
                out += [(r, fin), (fout, r)]
    if "lm_head" in targets:
        out += [(r, s.hidden_size), (s.vocab_size, r)]
    return out


def lora_tensor_sizes(s: ModelShape, r: int, targets: Sequence[str]) -> list[int]:
    """The number of elements of each LoRA tensor (see lora_shapes)."""
    return [numel(x) for x in lora_shapes(s, r, targets)]


def lora_param_count(model_cfg: Any, lora_r: int, lora_target_modules: str | Sequence[str]
                     = "all-linear") -> int:
    """LoRA adds r*(in+out) parameters per targeted linear (A: r x in, B: out x r)."""
    return sum(lora_tensor_sizes(model_shape(model_cfg), lora_r, lora_targets(lora_target_modules)))
