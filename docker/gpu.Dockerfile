# syntax=docker/dockerfile:1
# x86 GPU: export, TensorRT engine builds and GPU runs, on NVIDIA's TensorRT container (TensorRT, CUDA, drivers' libs).
# Build from the repository root: docker build -f docker/gpu.Dockerfile -t vl-export:gpu .
# Pick a container month whose release notes list TensorRT 11.x: the `trt` extra asks for tensorrt>=11 and pip would
# otherwise fetch a second TensorRT over the container's own.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:26.07-py3
FROM ${TENSORRT_IMAGE}

# The onnxruntime-gpu build must match the container's CUDA major version; override for another one.
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

# Bundles (and the Hugging Face cache, for real checkpoints) are mounted here. Run with --gpus all.
WORKDIR /work
ENTRYPOINT ["vl-export"]
CMD ["--help"]
