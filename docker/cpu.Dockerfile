# syntax=docker/dockerfile:1
# CPU runtime: the torch-free runtime on ONNX Runtime and nothing else (the `runtime` extra; no torch, no TensorRT).
# Build from the repository root: docker build -f docker/cpu.Dockerfile -t vl-export:cpu .
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/vl-export
COPY pyproject.toml README.md ./
COPY vl_export ./vl_export
COPY export ./export
COPY runtime ./runtime
COPY calibration ./calibration
RUN pip install ".[runtime]" \
 && useradd --create-home --uid 1000 vl

# Bundles are mounted here; the process runs unprivileged.
WORKDIR /work
USER vl
ENTRYPOINT ["vl-export"]
CMD ["--help"]
