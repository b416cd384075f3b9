# Pipeline image: STAC search, odc-stac/Dask load, zarr cubes, shards, refresh, Dask workers.
# GDAL comes inside the rasterio wheel: no system GDAL. No torch (see the [train] extra).
# Build from the repository root:  docker build -f docker/pipeline.Dockerfile -t spectralgpt-pipeline:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# cron runs the scheduled refresh in the compose example; tini reaps Dask worker children
RUN apt-get update \
    && apt-get install -y --no-install-recommends cron=3.0pl1-162 tini=0.19.0-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/spectralgpt
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY training ./training
COPY catalogs ./catalogs
COPY docker/cron ./docker/cron
# Numba's compiled kernels (pipeline/kernels.py) are built once here into a cache that the
# unprivileged user can read, instead of ~1.5 s of compiling at the start of every container.
ENV NUMBA_CACHE_DIR=/opt/spectralgpt/numba-cache
RUN pip install --no-cache-dir . \
    && python -c "from pipeline import kernels; kernels.warm_up()" \
    && chmod -R a+rwX /opt/spectralgpt/numba-cache \
    && useradd --create-home --uid 1000 eo \
    && mkdir -p /data \
    && chown eo /data

USER 1000
VOLUME ["/data"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "pipeline.build_shards", "--aoi", "europe", "--output", "/data/europe"]
