"""What a result was measured on: the record every results file carries beside its numbers.

Real-model numbers depend on more than the code. At 1-2 bits a float32 rounding difference flips a quantizer's
rounding decision and the flips compound through the layers. Uniform 2-bit KIVI on the bundled model (2 x 512
tokens), float32, on one Intel CPU: perplexity 16.320 with torch's AVX-512 kernels, 16.565 with AVX2 and 16.095 with
none (``ATEN_CPU_CAPABILITY`` = avx2 / default, ``MKL_ENABLE_INSTRUCTIONS`` = AVX2 / SSE4_2); in float64 all three
give 15.305338, with 1 or 2 threads. So a record names the package versions, the CPU, the SIMD level torch uses, the
threads and the dtype; :func:`environment` collects them without importing anything heavy (torch and JAX are asked
only if the caller already imported them).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["PACKAGES", "NUMERIC_ENV", "environment", "cpu_model"]

PACKAGES = ("rdalloc", "numpy", "scipy", "array-api-compat", "torch", "jax", "jaxlib", "transformers", "tokenizers",
            "huggingface-hub", "safetensors", "gguf", "accelerate", "kvpress")
NUMERIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY",
               "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OPENBLAS_CORETYPE", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(dtype: object = None, **extra: object) -> dict:
    """A JSON-ready record of the machine and software: Python, installed versions of :data:`PACKAGES` (absent ones
    left out), CPU model and count, the numerics-relevant environment variables that are set, torch's threads and SIMD
    level (if torch is imported), JAX's backend (if JAX is imported), ``dtype`` (as text) and any ``extra`` items."""
    record: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
                    "cpu_count": os.cpu_count(),
                    "packages": {n: v for n in PACKAGES if (v := _version(n)) is not None},
                    "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}}
    torch = sys.modules.get("torch")
    if torch is not None:
        record["torch_threads"] = torch.get_num_threads()
        record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        record["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    jax = sys.modules.get("jax")
    if jax is not None:
        record["jax_backend"] = jax.default_backend()
    if dtype is not None:
        record["dtype"] = str(dtype).removeprefix("torch.")
    record.update(extra)
    return record
