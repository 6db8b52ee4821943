"""What this CPU can do, for tests whose figures depend on it (bf16)."""

from __future__ import annotations

import functools
@functools.cache
def openvino_has_bf16() -> bool:
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
