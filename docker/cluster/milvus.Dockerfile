# A Milvus 2.3.5 standalone (embedded etcd, local storage) from the `milvus` PyPI wheel, as the tests run
# it (tests/milvus_server.py): no registry image needed. For production use Milvus' own images or Helm
# chart with external etcd and object storage (docs/deploy.md).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install milvus==2.3.5 \
    && useradd --system --uid 10002 --home-dir /var/lib/milvus --create-home milvus
USER milvus
VOLUME ["/var/lib/milvus"]
EXPOSE 19530 9091
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=10 \
    CMD ["curl", "-fs", "http://127.0.0.1:9091/healthz"]
CMD ["milvus-server", "--data", "/var/lib/milvus", "--proxy-port", "19530"]
