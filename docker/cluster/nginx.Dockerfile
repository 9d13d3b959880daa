# nginx from Debian's packages as the replicas' load balancer (round robin, health-checked upstreams).
FROM debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends nginx curl \
    && rm -rf /var/lib/apt/lists/* && rm -f /etc/nginx/sites-enabled/default
COPY nginx.conf /etc/nginx/conf.d/modret.conf
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --retries=5 CMD ["curl", "-fs", "http://127.0.0.1:8080/v2/health/live"]
CMD ["nginx", "-g", "daemon off;"]
