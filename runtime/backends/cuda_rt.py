"""cuda-python's runtime API for TensorRT: the GPU probe, one stream per backend, and device buffers that only grow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vl_export.errors import BackendUnavailableError

from .trt_plan import grown_bytes


def import_cudart():
    """cuda-python's runtime module, lazily: `cuda.bindings.runtime` (12.6+), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError(
                "the tensorrt backend needs cuda-python for device memory: pip install 'vl-export[trt]'"
            ) from None
    return cudart


def _error_name(cudart, err) -> str:
    try:
        return cudart.cudaGetErrorName(err)[1].decode()
    except Exception:  # the name is only for the message; the error itself is what matters
        return str(err)


def check(cudart, result, what: str):
    """cuda-python returns (error, *values); raise on an error, else return the values (one, several, or None)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_index(device: int | str) -> int:
    """The CUDA device ordinal from 0, "cuda" or "cuda:1"; TensorRT has no CPU device."""
    if isinstance(device, int):
        return device
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index.isdigit() or index == ""):
        raise BackendUnavailableError(f"TensorRT runs on a CUDA GPU: device must be cuda or cuda:N, not {device!r}")
    return int(index or 0)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int


def probe_gpu(cudart, device: int = 0) -> GpuInfo:
    """The GPU the backend will use; BackendUnavailableError when no CUDA GPU is visible."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        why = _error_name(cudart, err) if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendUnavailableError(
            f"no CUDA GPU is visible (cudaGetDeviceCount: {why}); TensorRT needs an NVIDIA GPU and its driver"
        )
    if not 0 <= device < count:
        raise BackendUnavailableError(f"GPU {device} was asked for but {count} GPU(s) are visible (0..{count - 1})")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(device, name.rstrip("\x00").strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


class Cuda:
    """One device and one stream: every copy and every engine run of a backend is ordered on this stream."""

    def __init__(self, cudart, device: int):
        self.cudart = cudart
        check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self.stream = check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        kinds = cudart.cudaMemcpyKind
        self._h2d, self._d2h = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def malloc(self, nbytes: int) -> int:
        return int(check(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc of {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        # From pageable memory the call returns once the source is staged, so `array` may go right after.
        array = np.ascontiguousarray(array)
        check(self.cudart, self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, self._h2d, self.stream),
              "cudaMemcpyAsync to the GPU")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        """Fill the contiguous `array` from `ptr`; valid after `synchronize`."""
        check(self.cudart, self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, self._d2h, self.stream),
              "cudaMemcpyAsync to the host")

    def synchronize(self) -> None:
        check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class DeviceBuffer:
    """A device allocation reused while large enough and replaced, never shrunk, when a request outgrows it."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        size = grown_bytes(nbytes, self.nbytes)
        if size != self.nbytes:
            self.release()
            self.ptr, self.nbytes = self.cuda.malloc(size), size
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0
