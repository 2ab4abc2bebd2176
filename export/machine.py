"""What this machine is: CPU model and instruction sets, cores, CUDA.  Recorded in every report."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from serve.contract import UserError

ISA_FLAGS = {"avx512_vnni": "avx512_vnni", "avx512": "avx512f", "avx2": "avx2"}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    import onnxruntime as ort

    flags = cpu_flags()
    interesting = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")) or f in ("asimd", "sve"))
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": interesting,
        "cuda": "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present(),
        "onnxruntime_providers": ort.get_available_providers(),
    }


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def resolve_isa(requested: str, host: dict) -> str:
    """The int8 configuration to use: the best the CPU has, or the requested one if it has it."""
    arm = host["arch"] in ("aarch64", "arm64")
    flags = set(host["flags"])
    if requested == "auto":
        if arm:
            return "arm64"
        for isa, flag in ISA_FLAGS.items():
            if flag in flags:
                return isa
        raise UserError("this CPU has neither AVX2 nor AVX-512 nor ARM64; int8 recipes need one of them")
    if requested == "arm64" and not arm or requested != "arm64" and ISA_FLAGS[requested] not in flags:
        raise UserError(f"--isa {requested} was requested but this CPU ({host['cpu']}) lacks it; use --isa auto")
    return requested
