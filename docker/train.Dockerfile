# Training image: CUDA PyTorch + DeepSpeed, for `deepspeed training/pretrain.py` on GPU nodes.
# Build from the repository root:  docker build -f docker/train.Dockerfile -t spectralgpt-train:0.1.0 .
# The base image ships CUDA 12.8 and cuDNN; torch comes from the PyTorch CUDA 12.8 wheel index.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# python3.12 is Ubuntu 24.04's interpreter; gcc/ninja let DeepSpeed JIT-build its ops
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.3-0ubuntu2 python3-pip=24.0+dfsg-1ubuntu1 \
       python3-dev=3.12.3-0ubuntu2 ninja-build=1.11.1-2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/spectralgpt
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY training ./training
COPY catalogs ./catalogs
# versions are pinned in pyproject.toml (the [train] extra), which hadolint cannot see
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]"

# torchrun/deepspeed launch from here; mount datasets at /data and runs at /runs
VOLUME ["/data", "/runs"]
CMD ["deepspeed", "training/pretrain.py", "--config", "training/configs/base_gpu.yaml"]
