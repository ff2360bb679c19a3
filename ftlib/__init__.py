"""ftlib: QLoRA fine-tuning of LLMs on Slurm clusters (see README.md and DESIGN.md)."""
import logging as _logging


def _not_the_kernels_hint(record: _logging.LogRecord) -> bool:
    # bitsandbytes warns on import, on CPUs with AVX512-BF16, that it could not fetch an optional
    # kernel from the Hugging Face Hub ("pip install kernels"). ftlib pins 4-bit layers to the
    # portable CPU path (model.keep_one_cpu_4bit_path), which never uses that kernel, and compute
    # nodes are often offline: the line is noise before every error message and log.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_hint)


def _not_the_cpu_accelerator_notice(record: _logging.LogRecord) -> bool:
    # DeepSpeed, imported by transformers whenever it is installed, warns on every CPU machine
    # (a login node, a --dry-run, a CPU debug run) that it found no GPU; ftlib knows where it runs.
    return not str(record.msg).startswith("Setting accelerator to CPU")


_logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_accelerator_notice)


import warnings as _warnings

# peft 0.21's PeftModel asks transformers for `is_gradient_checkpointing`, which transformers 5
# renamed to `is_activation_checkpointing`: a warning about peft's code, not the user's config
# (ftlib's configs use training.activation_checkpointing), repeated on every run.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
