# Pipeline image: STAC search, Dask load, zarr cubes, shards, refresh, Dask workers.
# GDAL comes inside the rasterio wheel: no system GDAL. No torch (see the [train] extra).
# Dependencies come from requirements/pipeline.lock (exact pins); the project is installed as
# its wheel, so the image runs the installed `spectralgpt` command, not the source tree.
# Build from the repository root:  docker build -f docker/pipeline.Dockerfile -t spectralgpt-pipeline:0.2.0 .

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

# cron runs the scheduled refresh in the compose example; tini reaps Dask worker children
RUN apt-get update \
    && apt-get install -y --no-install-recommends cron=3.0pl1-162 tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

COPY requirements/pipeline.lock /tmp/pipeline.lock
RUN pip install --no-cache-dir --no-deps -r /tmp/pipeline.lock
COPY --from=wheel /wheels /tmp/wheels
# Numba's compiled kernels (pipeline/kernels.py) are built once here into a cache that the
# unprivileged user can read, instead of ~1.5 s of compiling at the start of every container.
ENV NUMBA_CACHE_DIR=/opt/spectralgpt/numba-cache
# pip check: the lock and the wheel's declared ranges agree (no missing or conflicting pin)
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip check \
    && rm -rf /tmp/wheels /tmp/pipeline.lock \
    && python -c "from pipeline import kernels; kernels.warm_up()" \
    && chmod -R a+rwX /opt/spectralgpt/numba-cache \
    && useradd --create-home --uid 1000 eo \
    && mkdir -p /data \
    && chown eo /data

COPY docker/cron /opt/spectralgpt/cron
WORKDIR /data
USER 1000
VOLUME ["/data"]
ENTRYPOINT ["tini", "--"]
CMD ["spectralgpt", "build", "--aoi", "europe", "--output", "/data/europe"]
