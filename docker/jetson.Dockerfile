# syntax=docker/dockerfile:1
# Jetson (JetPack / L4T, arm64): the runtime on the JetPack's own TensorRT, building engines on the device itself,
# since a plan runs only on the GPU model that built it. No torch: bundles are exported on another machine.
# Build on the Jetson from the repository root: docker build -f docker/jetson.Dockerfile -t vl-export:jetson .
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${L4T_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3-pip python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vl-export
COPY pyproject.toml README.md ./
COPY vl_export ./vl_export
COPY export ./export
COPY runtime ./runtime
COPY calibration ./calibration
# The runtime extra, and the trt extra's packages but tensorrt itself: TensorRT 11 has no JetPack build, so the
# image uses the JetPack's TensorRT 10 (python3-libnvinfer above), which vl-export supports. cuda-python follows
# the JetPack's CUDA 12.
RUN python3 -m pip install ".[runtime]" "polygraphy>=0.49" "cuda-python>=12.6,<13" \
 && python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

WORKDIR /work
ENTRYPOINT ["vl-export"]
CMD ["--help"]
