"""cuda-python's runtime API for TensorRT: the GPU probe, one stream per backend, and device buffers that only grow.

CUDA's current device is per thread: every thread starts on device 0, and `cudaSetDevice` changes only its own.
So `Cuda.activate` is called at the top of every session call (the server's worker threads are not the thread that
opened the sessions), and every allocation, copy and engine run happens with the backend's device current.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import numpy as np

from vl_export.errors import BackendUnavailableError

from .trt_plan import grown_bytes

# The oldest driver that runs each CUDA major (minor-version compatibility: any 12.x runtime on a 525+ driver).
MIN_DRIVER = {12: "525", 13: "580"}
CUDA_PYTHON_FOR = {12: "cuda-python>=12.9.1,<13", 13: "cuda-python>=13,<14"}


def import_cudart():
    """cuda-python's runtime module, lazily: `cuda.bindings.runtime` (12.6+; the only one in 13.x, which removed
    `cuda.cudart`), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError(
                "the tensorrt backend needs cuda-python for device memory: pip install 'vl-export[trt]' "
                "(TensorRT for CUDA 13, driver >= 580) or 'vl-export[trt-cu12]' (CUDA 12, driver >= 525)"
            ) from None
    return cudart


def native_handle(obj) -> int:
    """The address behind a cuda-python object (a stream): `get_cuda_native_handle`, as `int(obj)` is deprecated.

    The accessor exists from cuda-python 12.9.1 / 13.0; older 12.x releases have only `int()` (the trt-cu12 extra
    pins 12.9.1+, so this fallback serves installs made outside the extras)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


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


def cuda_version(encoded: int) -> str:
    """CUDA's version encoding, 1000 * major + 10 * minor: 12040 -> '12.4'."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheels are built for (tensorrt-cu12-* / tensorrt-cu13-*), or None when
    TensorRT came another way (NVIDIA's container, apt, JetPack), whose packages do not say."""
    for major in (13, 12):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}"):
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            return major
    return None


def check_cuda_versions(cudart, tensorrt_major: int | None) -> None:
    """Refuse, naming the real cause, when the driver is older than cuda-python's CUDA or the two CUDA majors differ.

    cuda-python 13 on a driver before 580 fails every call with cudaErrorInsufficientDriver, which would otherwise
    surface as 'no CUDA GPU'. One CUDA major per process: TensorRT's and cuda-python's must match."""
    runtime = check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")  # cuda-python's own CUDA
    major = runtime // 1000
    err, driver = cudart.cudaDriverGetVersion()  # the newest CUDA the driver runs; 0 when no driver is loaded
    if err == cudart.cudaError_t.cudaSuccess and driver == 0:
        raise BackendUnavailableError("no NVIDIA driver is loaded (cudaDriverGetVersion: 0); TensorRT needs an "
                                      "NVIDIA GPU and its driver")
    if err == cudart.cudaError_t.cudaSuccess and driver // 1000 < major:  # same major, older minor: compatible
        raise BackendUnavailableError(
            f"the NVIDIA driver supports CUDA {cuda_version(driver)} but cuda-python is built for CUDA "
            f"{cuda_version(runtime)}, which needs driver >= {MIN_DRIVER.get(major, '?')}: update the driver, or use "
            f"TensorRT and cuda-python for CUDA {driver // 1000} (pip install 'vl-export[trt-cu12]')"
        )
    if tensorrt_major is not None and tensorrt_major != major:
        raise BackendUnavailableError(
            f"TensorRT is built for CUDA {tensorrt_major} but cuda-python for CUDA {major}; install the matching one: "
            f"pip install '{CUDA_PYTHON_FOR.get(tensorrt_major, f'cuda-python=={tensorrt_major}.*')}'"
        )


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int


def probe_gpu(cudart, device: int = 0, tensorrt_major: int | None = None) -> GpuInfo:
    """The GPU the backend will use; BackendUnavailableError with the real cause when it cannot be used."""
    check_cuda_versions(cudart, tensorrt_major)
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
        self.cudart, self.device = cudart, device
        self.activate()
        self.stream = check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")  # belongs to `device`
        self.stream_handle = native_handle(self.stream)  # what TensorRT's *_async calls take
        kinds = cudart.cudaMemcpyKind
        self._h2d, self._d2h = kinds.cudaMemcpyHostToDevice, kinds.cudaMemcpyDeviceToHost

    def activate(self) -> None:
        """Make this backend's device current in the calling thread (a no-op cost when it already is)."""
        check(self.cudart, self.cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def free_bytes(self) -> int:
        free, _total = check(self.cudart, self.cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)

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
