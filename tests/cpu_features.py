"""What this CPU can do, for tests whose figures depend on it (int8 dot-product instructions, bf16)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def has_int8_dot_product() -> bool:
    """AVX-512 VNNI or AVX-VNNI: int8 products summed in int32. Without them (AVX2 only) ONNX Runtime's and
    OpenVINO's int8 kernels multiply u8 x s8 with VPMADDUBSW, whose int16 pair sums saturate."""
    flags = cpu_flags()
    return not flags or bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


@functools.cache
def openvino_has_bf16() -> bool:
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
