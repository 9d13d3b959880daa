# modret: the API and web UI in a small image. Two stages: a builder makes a virtualenv with every
# dependency, the runtime stage copies only that venv onto the same base (no compilers, no pip cache).
#
#   docker build -t modret .                                   # CPU torch from download.pytorch.org/whl/cpu
#   docker build -t modret --build-arg VARIANT=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 .   # CUDA base + CUDA torch (GPU hosts)
#   docker build -t modret --build-arg TORCH_INDEX_URL= \
#       --build-arg TORCH_SPEC=torch==2.13.0 .                 # torch from wheels/ (see wheels/README.md)
#   docker build -t modret --build-arg PIP_OFFLINE=1 .         # air-gapped: every wheel from wheels/
#
# Start: with nothing mounted the container runs `modret demo` (trains the demo model into /data at first
# start, or reuses it, indexes synthetic faces, serves on 8000); mount a run and a gallery to serve your
# own (docker/entrypoint.sh, docs/deploy.md).

# VARIANT picks the torch build (cpu | cuda); BASE_IMAGE the base. For GPU hosts give both:
#   --build-arg VARIANT=cuda --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
# (the CUDA torch wheels carry their own CUDA libraries, so VARIANT=cuda on the slim base runs too).
ARG VARIANT=cpu
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# A CUDA base has no Python: take the distribution's (3.11+ on Debian 12 / Ubuntu 24.04).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS builder
ARG VARIANT
# Where torch comes from: "auto" is download.pytorch.org's CPU index, or its CUDA_TAG index for
# VARIANT=cuda; empty: PyPI and wheels/ only.
ARG TORCH_INDEX_URL=auto
ARG CUDA_TAG=cu126
ARG TORCH_SPEC=torch
# A directory of the build context whose wheels pip may use (--find-links); 1 in PIP_OFFLINE: only those.
ARG WHEELS_DIR=wheels
ARG PIP_OFFLINE=0
# Optional extras of the package, e.g. "milvus" for a Milvus cluster backend.
ARG EXTRAS=
RUN python3 -m venv /opt/modret
ENV PATH=/opt/modret/bin:$PATH
COPY ${WHEELS_DIR}/ /wheels/
RUN set -eu; \
    offline=""; [ "$PIP_OFFLINE" = 1 ] && offline="--no-index"; \
    url="$TORCH_INDEX_URL"; \
    case "$VARIANT:$url" in \
        cpu:auto) url=https://download.pytorch.org/whl/cpu ;; \
        cuda:auto) url="https://download.pytorch.org/whl/$CUDA_TAG" ;; \
        cpu:*|cuda:*) ;; \
        *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac; \
    index=""; [ -n "$url" ] && [ -z "$offline" ] && index="--index-url $url"; \
    pip install --find-links /wheels $offline $index "$TORCH_SPEC"
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY index /src/index
COPY service /src/service
# After installing, drop what a server never needs: torch's headers and cmake files, pip, bytecode.
RUN set -eu; \
    offline=""; [ "$PIP_OFFLINE" = 1 ] && offline="--no-index"; \
    pip install --find-links /wheels $offline "/src${EXTRAS:+[$EXTRAS]}" \
    && python -c "import torch, faiss, fastapi, service.cli" \
    && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && rm -rf "$site"/torch/include "$site"/torch/test "$site"/torch/share/cmake \
              "$site"/caffe2 "$site"/torch/bin/test_* "$site"/pip "$site"/pip-* \
    && find /opt/modret -name __pycache__ -type d -prune -exec rm -rf {} +

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="modret" \
      org.opencontainers.image.description="Attribute-conditioned image retrieval with modulation modules" \
      org.opencontainers.image.licenses="MIT"
# A fixed UID/GID so that a host directory or volume can be prepared for it (chown 10001:10001).
RUN groupadd --system --gid 10001 modret \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin modret \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=builder /opt/modret /opt/modret
COPY docker/entrypoint.sh /usr/local/bin/modret-entrypoint
COPY docker/healthcheck.py /usr/local/lib/modret-healthcheck.py
RUN chmod 0755 /usr/local/bin/modret-entrypoint && chmod 0644 /usr/local/lib/modret-healthcheck.py
ENV PATH=/opt/modret/bin:$PATH \
    MODRET_DATA_DIR=/data \
    MODRET_HOST=0.0.0.0 \
    MODRET_PORT=8000
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# The first start may train the demo model (minutes on a CPU): the start period covers it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "/usr/local/lib/modret-healthcheck.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["modret-entrypoint"]
