# PostgreSQL 15 from Debian's packages (no registry image needed): the replicas' metadata (#14).
FROM debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
RUN chmod 0755 /usr/local/bin/postgres-entrypoint
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=5s --retries=10 CMD ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1"]
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint"]
