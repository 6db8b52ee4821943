# syntax=docker/dockerfile:1
# x86 GPU: export, TensorRT engine builds and GPU runs, on NVIDIA's TensorRT container (TensorRT, CUDA, drivers' libs).
# Build from the repository root: docker build -f docker/gpu.Dockerfile -t vl-export:gpu .
# Pick a container month whose release notes list TensorRT 11.x on CUDA 13: the `trt` extra asks for tensorrt>=11 and
# cuda-python 13, so pip would otherwise fetch a second TensorRT over the container's own, or a mismatched CUDA.
# The default tag is unverified (not pulled here): check its release notes before relying on it.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:26.07-py3
FROM ${TENSORRT_IMAGE}

# The onnxruntime-gpu build must match the container's CUDA major version (the last RUN checks it); override with a
# package spec or an index URL for another one, e.g. ORT's CUDA 13 feed when PyPI's wheel is built for CUDA 12.
ARG ONNXRUNTIME_GPU=onnxruntime-gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/vl-export
COPY pyproject.toml README.md ./
COPY vl_export ./vl_export
COPY export ./export
COPY runtime ./runtime
COPY calibration ./calibration
# Export traces on the CPU, so torch's CPU wheel is enough (gigabytes smaller than the CUDA one). The runtime extra
# brings the CPU onnxruntime; it is swapped for onnxruntime-gpu, since both install the same `onnxruntime` module.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch \
 && pip install ".[export,trt]" \
 && pip uninstall --yes onnxruntime \
 && pip install "${ONNXRUNTIME_GPU}" \
 && python -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
# One CUDA major in the image: the container's (CUDA_VERSION, set by NVIDIA's images), cuda-python's and
# onnxruntime-gpu's must agree, or the build stops here rather than at the first GPU run.
RUN python -c "import os, onnxruntime as ort; from cuda.bindings import runtime as rt; \
image = os.environ['CUDA_VERSION'].split('.')[0]; bindings = str(rt.cudaRuntimeGetVersion()[1] // 1000); \
print('CUDA: image', image, 'cuda-python', bindings, 'onnxruntime-gpu', ort.cuda_version); \
assert image == bindings == ort.cuda_version.split('.')[0], 'CUDA majors differ: see docker/README.md'"

# Bundles (and the Hugging Face cache, for real checkpoints) are mounted here. Run with --gpus all.
WORKDIR /work
ENTRYPOINT ["vl-export"]
CMD ["--help"]
