"""docker-compose.yml's ``cluster`` profile (#14), read by ``docker compose config`` (no engine needed):
PostgreSQL, Milvus, two replicas and a balancer, every image built here (none pulled: no registry is
reachable), the replicas pointed at both engines and started after them, the balancer at both replicas.
Building and starting the whole profile (``up --build --wait cluster-lb``: minutes, the replicas' image
installs torch) was done once by hand, as ``docs/deploy.md`` records; this test only reads the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cluster_config() -> dict:
    if shutil.which("docker") is None:
        pytest.skip("no `docker` command")
    env = dict(os.environ)
    plugins = Path(os.environ.get("CONTAINER_ENGINE_STATE", "/tmp/container-engine")) / "dockercfg"
    if "DOCKER_CONFIG" not in env and (plugins / "cli-plugins").is_dir():
        env["DOCKER_CONFIG"] = str(plugins)
    # Docker CLIs word a missing plugin differently ("is not a docker command", "unknown command"):
    # asking the plugin its version tells, whatever the wording.
    probe = subprocess.run(
        ["docker", "compose", "version"], env=env, capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.skip("no Compose v2 plugin (../shared/tools/container-engine.sh up installs it)")
    done = subprocess.run(
        ["docker", "compose", "--profile", "cluster", "config", "--format", "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_cluster_profile_builds_every_image_and_wires_replicas_to_both_engines() -> None:
    services = cluster_config()["services"]
    cluster = {name: s for name, s in services.items() if "cluster" in s.get("profiles", [])}
    assert set(cluster) == {"cluster-postgres", "cluster-milvus", "modret-a", "modret-b", "cluster-lb"}
    assert all("build" in s for s in cluster.values()), "an image would be pulled"
    for name in ("modret-a", "modret-b"):
        replica = cluster[name]
        env = replica["environment"]
        assert (
            env["MODRET_METADATA_URL"].startswith("postgresql://modret:")
            and "@cluster-postgres:5432/" in env["MODRET_METADATA_URL"]
        )
        assert env["MODRET_MILVUS_URI"] == "http://cluster-milvus:19530"
        assert replica["build"]["args"]["EXTRAS"] == "cluster"
        assert {k: v["condition"] for k, v in replica["depends_on"].items()} == {
            "cluster-postgres": "service_healthy",
            "cluster-milvus": "service_healthy",
        }
    assert cluster["modret-a"]["volumes"] != cluster["modret-b"]["volumes"]
    assert set(cluster["cluster-lb"]["depends_on"]) == {"modret-a", "modret-b"}
    nginx = (ROOT / "docker" / "cluster" / "nginx.conf").read_text()
    assert "server modret-a:8000" in nginx and "server modret-b:8000" in nginx
    for dockerfile in ("postgres.Dockerfile", "milvus.Dockerfile", "nginx.Dockerfile"):
        base = (ROOT / "docker" / "cluster" / dockerfile).read_text().split("FROM ", 1)[1].split()[0]
        assert base in ("debian:bookworm", "python:3.11-slim"), (
            f"{dockerfile}: FROM {base} has no local stand-in"
        )
