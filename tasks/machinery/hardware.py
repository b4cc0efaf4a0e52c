"""The hardware a run computes on, as far as it decides the numbers.

Floating-point results are bit-exact only on the same hardware and software: another CPU (other
vector instructions), another thread count or another torch build changes the order of additions and
so the last bits of every weight, which training then amplifies. Every pipeline and stage run records
this description in MLflow, and `posttrain reproduce` compares it before demanding exact equality.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# CPU features that select different math kernels (x86 SIMD, AMX tiles, ARM NEON/SVE).
_NUMERIC_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")

# What must be equal for a rerun to be bit-identical. The CPU model and core count are recorded but not
# compared: two models with the same instruction set and thread count compute the same bits.
NUMERIC_KEYS = ("machine", "cpu_capability", "cpu_flags", "torch_threads", "torch", "cuda", "cudnn", "gpus")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model in ("", "unknown", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, sorted(f for f in set(flags) if f in _NUMERIC_FLAGS)


@lru_cache(maxsize=None)
def _static() -> dict:
    import torch

    model, flags = _cpu_model_and_flags()
    cuda = torch.cuda.is_available()
    return {
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_count": os.cpu_count() or 0,
        "cpu_flags": ",".join(flags),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "none",
        "gpus": ",".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none",
    }


def describe() -> dict[str, str | int]:
    """This process's compute: CPU model, numeric CPU flags, torch's kernel level, threads, torch/CUDA
    build, GPU names."""
    import torch

    return {**_static(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def differences(recorded: dict, current: dict) -> list[str]:
    """'key: recorded -> current' for every numerics-relevant key that differs."""
    return [f"{key}: {recorded.get(key, '?')} -> {current.get(key, '?')}" for key in NUMERIC_KEYS
            if str(recorded.get(key, "?")) != str(current.get(key, "?"))]


def as_tags(info: dict) -> dict[str, str]:
    return {f"posttrain.hardware.{k}": str(v) for k, v in info.items()}


def from_tags(tags: dict[str, str]) -> dict[str, str]:
    prefix = "posttrain.hardware."
    return {k[len(prefix):]: v for k, v in tags.items() if k.startswith(prefix)}
