# Training image: CUDA PyTorch + DeepSpeed on CPython 3.11 (the Python the lock is made for).
# torch and its CUDA libraries (cuDNN, cuBLAS, NCCL) come as PyPI wheels pinned in
# requirements/train.lock (torch 2.13, CUDA 13 wheels: the host needs an NVIDIA driver that
# supports CUDA 13). The project is installed as its wheel; the image runs the installed
# `spectralgpt` command, not the source tree.
# Build from the repository root:  docker build -f docker/train.Dockerfile -t spectralgpt-train:0.2.0 .
# Run with shared memory for the DataLoader workers and the data/run volumes, e.g.
#   docker run --gpus all --ipc=host -v /mnt/datasets:/data -v /mnt/runs:/runs spectralgpt-train:0.2.0

# --- the project's wheel (nothing of this stage reaches the image but the .whl)
FROM python:3.11.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md ./
COPY spectralgpt ./spectralgpt
COPY pipeline ./pipeline
COPY training ./training
COPY catalogs ./catalogs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- the image
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc/g++/ninja: DeepSpeed JIT-builds its small ops on first use (cached in ~/.cache/torch_extensions);
# pdsh + openssh-client: DeepSpeed's multi-node launcher; libibverbs/rdma: NCCL over InfiniBand/RoCE
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 g++=4:12.2.0-3 ninja-build=1.11.1-2~deb12u1 \
       pdsh=2.34-0.2 openssh-client=1:9.2p1-2+deb12u10 libibverbs1=44.0-2 ibverbs-providers=44.0-2 \
       librdmacm1=44.0-2 \
    && rm -rf /var/lib/apt/lists/*

COPY requirements/train.lock /tmp/train.lock
RUN pip install --no-cache-dir --no-deps -r /tmp/train.lock
COPY --from=wheel /wheels /tmp/wheels
# pip check: the lock and the wheel's declared ranges agree (no missing or conflicting pin)
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip check \
    && rm -rf /tmp/wheels /tmp/train.lock

# Datasets are read from /data, runs written to /runs (mount both; see README "Docker").
WORKDIR /runs
VOLUME ["/data", "/runs"]
# The deepspeed launcher starts one `spectralgpt pretrain` per GPU of the node.
CMD ["deepspeed", "--no_python", "spectralgpt", "pretrain", "--config", "base_gpu", \
     "--set", "manifest=/data/europe/manifest.json", "--set", "output_dir=/runs/base_gpu"]
