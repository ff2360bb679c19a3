"""ftlib: QLoRA fine-tuning of LLMs on Slurm clusters (see README.md and DESIGN.md)."""
import logging as _logging


def _not_the_kernels_hint(record: _logging.LogRecord) -> bool:
    # bitsandbytes warns on import, on CPUs with AVX512-BF16, that it could not fetch an optional
    # kernel from the Hugging Face Hub ("pip install kernels"). ftlib pins 4-bit layers to the
    # portable CPU path (model.keep_one_cpu_4bit_path), which never uses that kernel, and compute
    # nodes are often offline: the line is noise before every error message and log.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_hint)
