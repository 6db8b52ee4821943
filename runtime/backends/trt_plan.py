"""Pure planning for the TensorRT sessions: dtype mapping, axis sizes of a request, and bytes per device buffer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from vl_export.errors import BundleError, InputError
from vl_export.manifest import TensorSpec

# TensorRT DataType member names -> numpy; BF16, FP8, INT4 and FP4 have no numpy type, so they cannot be graph IO here.
NUMPY_DTYPES = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
# Small buffers grow to the next power of two, large ones to whole MiB: a prompt a few tokens longer than the last
# one then reuses its buffers instead of reallocating on every request.
GROWTH_BYTES = 1 << 20
MIN_BYTES = 256  # cudaMalloc's alignment; never 0 bytes, as an empty past (past 0) still needs a valid address


def numpy_dtype(trt_dtype_name: str, tensor: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[trt_dtype_name]
    except KeyError:
        raise BundleError(
            f"engine tensor {tensor} has TensorRT type {trt_dtype_name}, which has no numpy type; graph inputs and "
            f"outputs must be one of {', '.join(NUMPY_DTYPES)}"
        ) from None


def tensor_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def kv_bytes(batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: np.dtype) -> int:
    """One key or value buffer holding `capacity` positions: (batch, kv_heads, capacity, head_dim)."""
    return tensor_bytes((batch, kv_heads, capacity, head_dim), dtype)


def grown_bytes(need: int, have: int) -> int:
    """Size to allocate when `need` bytes do not fit in `have`: rounded up so nearby requests reuse it."""
    if need <= have:
        return have
    if need <= GROWTH_BYTES:
        return max(MIN_BYTES, 1 << (need - 1).bit_length())
    return -(-need // GROWTH_BYTES) * GROWTH_BYTES


def axis_sizes(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]], what: str) -> dict[str, int]:
    """Sizes of the symbolic axes (tiles, batch, seq, ...) read from the request, checked against the graph's IO."""
    missing = [t.name for t in specs if t.name not in shapes]
    if missing:
        raise InputError(f"the {what} graph needs inputs {', '.join(missing)}")
    sizes: dict[str, int] = {}
    for t in specs:
        shape = tuple(shapes[t.name])
        if len(shape) != len(t.shape):
            raise InputError(f"{t.name} has {len(shape)} dimensions, the {what} graph takes {len(t.shape)}: {t.shape}")
        for axis, (want, got) in enumerate(zip(t.shape, shape)):
            if isinstance(want, int) and want != got:
                raise InputError(f"{t.name} dimension {axis} is {got}, the {what} graph takes {want}")
            if isinstance(want, str) and sizes.setdefault(want, got) != got:
                raise InputError(f"{t.name} has {want} {got}, another input has {want} {sizes[want]}")
    return sizes


def resolve_shape(shape: Sequence[int | str], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A manifest shape with its symbolic axes replaced by their sizes: ('batch', 2, 'past', 64) -> (1, 2, 7, 64)."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def profile_axes(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[Sequence[int]]], what: str) -> dict:
    """(min, opt, max) of each symbolic axis, read from an engine's (min, opt, max) shapes of its input tensors.

    An axis that appears in several tensors (batch, past) must have one range, or the engine is not this graph's."""
    axes: dict[str, tuple[int, int, int]] = {}
    for t in specs:
        low, opt, high = (tuple(s) for s in shapes[t.name])
        for axis, name in enumerate(t.shape):
            if isinstance(name, str):
                got = (low[axis], opt[axis], high[axis])
                if axes.setdefault(name, got) != got:
                    raise BundleError(f"the {what} engine gives {name} the range {got} in {t.name} but "
                                      f"{axes[name]} in another input; it was not built from this graph")
    return axes


def chunks(length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) runs of at most `size` positions covering `length`: a long prompt prefilled in pieces."""
    return [(start, min(length, start + size)) for start in range(0, length, size)]
