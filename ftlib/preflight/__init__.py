"""Preflight: predict GPU memory and step time before a job waits in a Slurm queue.

Everything but check.py is a pure function of the model's shape (an HF ``config.json`` dict, a
``PretrainedConfig``, or a path to either) and the training settings: no model is downloaded, no
tensor is allocated, torch is not imported.

  shape.py        ModelShape, parameter and LoRA counts, dtype sizes, GiB, PreflightError
  memory.py       estimate_memory / MemoryEstimate (conventions and assumptions), which adds up
    process.py      the settings and sizes one estimate is computed from
    model_state.py  weights, gradients, optimizer state (held for the whole run)
    activations.py  saved activations, the loss, one layer's backward (grow with the batch)
  gpus.py         GPU catalogue, check_fits / method_advice, FLOPs, step time, MFU
  stats.py        data_statistics: token lengths, truncation, padding per batching strategy
  report.py       format_report: the readable report
  check.py        preflight(cfg): a RunConfig through all of the above (the CLI's entry point)

The public names are re-exported here (``from ftlib.preflight import estimate_memory``).
"""
from .gpus import (DEFAULT_MFU, GPU_MEMORY_GIB, GPU_PEAK_TFLOPS, GPU_SPECS, GPUSpec,
                   StepTimeEstimate, Verdict, check_fits, estimate_step_time, flops_per_token,
                   gpu_memory_gib, method_advice, mfu, resolve_gpu)
from .memory import CUDA_OVERHEAD_BYTES, MemoryEstimate, estimate_memory
from .report import format_report
from .shape import (DTYPE_BYTES, LINEAR_MODULES, GiB, ModelShape, PreflightError, count_params,
                    lora_param_count, model_shape)
from .stats import data_statistics

__all__ = ["CUDA_OVERHEAD_BYTES", "DEFAULT_MFU", "DTYPE_BYTES", "GPU_MEMORY_GIB", "GPU_PEAK_TFLOPS",
           "GPU_SPECS", "GPUSpec", "GiB", "LINEAR_MODULES", "MemoryEstimate", "ModelShape",
           "PreflightError", "StepTimeEstimate", "Verdict", "check_fits", "count_params",
           "data_statistics", "estimate_memory", "estimate_step_time", "flops_per_token",
           "format_report", "gpu_memory_gib", "lora_param_count", "method_advice", "mfu",
           "model_shape", "resolve_gpu"]
