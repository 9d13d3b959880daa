"""A real Milvus server for the cluster tests, without container images: the standalone binary (embedded
etcd, RocksMQ, local storage) that the PyPI package ``milvus`` (2.3.5) ships, started in a temporary
directory on free loopback ports.

``start(base_dir)`` renders the package's config template into ``base_dir`` with a free port for every
listener the binary opens: the proxy (the address clients use), its internal port, every coordinator and
node, the metrics/health port (``METRICS_PORT``, 9091 by default) and embedded etcd's client and peer
ports (2379/2380 by default, which the template does not expose: they are set through an etcd config file
that ``etcd.config.path`` names). So parallel test sessions on one machine never collide, nor reach each
other's servers. The binary runs in a process group of its own that dies with the test process (Linux
``PR_SET_PDEATHSIG``), so even a killed pytest leaves no server behind; ``stop`` ends it (SIGTERM, then
SIGKILL). The decompressed binaries (~250 MB, ~5 s to unpack) are kept in a per-user cache
(``$XDG_CACHE_HOME/modret/milvus-server-<version>``, or ``MODRET_TEST_MILVUS_CACHE``) and shared by
sessions; each server's data lives only under its ``base_dir``.

Fixtures (registered in ``tests/conftest.py``): ``milvus_server`` starts one server per test session
(skipping every test that needs it, with the reason, when it cannot start: package missing, not Linux,
the binary failing) and stops it at the end, failed tests or not; ``milvus_prefix`` is a collection prefix
of one test's own, whose collections are dropped after it, so tests sharing the server never see each
other's collections.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 180.0  # measured 9-20 s on two shared cores; generous for a loaded CI machine
STOP_TIMEOUT_S = 5.0  # SIGKILL after this (the server gives up its graceful stop after GRACEFUL_STOP_S)
# Settings of milvus.yaml changed for tests (dotted keys of the package's template). A query node's graceful
# stop otherwise waits up to 30 minutes to hand its segments to another node, which a test server has none
# of. A shorter time tick makes Strong-consistency reads (which wait for the tick after the write) faster.
TEST_CONFIG: dict[str, int] = {
    "common.gracefulStopTimeout": 3,
    "proxy.timeTickInterval": 50,
    "queryCoord.checkInterval": 200,
    "queryCoord.distPullInterval": 100,
}


class ServerUnavailable(RuntimeError):
    """The Milvus server cannot run here; the message says why (shown as the tests' skip reason)."""


@dataclass
class MilvusServer:
    base_dir: Path
    port: int  # the proxy: what clients connect to
    metrics_port: int  # /healthz, /metrics
    process: subprocess.Popen[bytes]
    start_s: float = 0.0  # how long the start took, until the server answered a client
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def client(self) -> Any:
        """A new ``pymilvus.MilvusClient`` connected to this server (close it when done)."""
        from pymilvus import MilvusClient

        return MilvusClient(uri=self.uri)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("milvus-stderr.log", "milvus-stdout.log"):
            path = self.base_dir / "logs" / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``STOP_TIMEOUT_S``; idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # Anything left in the group (there should be nothing): killed, so no server outlives a session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def unavailable_reason() -> str | None:
    """Why no Milvus server can start here without trying, else None."""
    if not sys.platform.startswith("linux"):
        return f"the milvus package's server binary runs on Linux only (this is {sys.platform})"
    try:
        import milvus  # noqa: F401
    except ImportError as e:
        return f"the Milvus server package is not installed ({e}): pip install milvus==2.3.5 (modret[dev])"
    try:
        import pymilvus  # noqa: F401
    except ImportError as e:
        return f"pymilvus is not installed ({e}): pip install modret[cluster]"
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, so the kernel hands out distinct ones)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cache_dir(version: str) -> Path:
    if explicit := os.environ.get("MODRET_TEST_MILVUS_CACHE"):
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "modret" / f"milvus-server-{version}"


def _binaries(version: str) -> Path:
    """The directory holding the unpacked ``milvus`` binary and its libraries (unpacked once per user,
    under a lock, by the package's own routine, which skips files whose checksum it already recorded)."""
    import milvus

    cache = _cache_dir(version)
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(str(cache))  # writes cache/bin/*
    return cache / "bin"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: SIGKILL when the test process dies


def start(base_dir: Path, *, timeout: float = START_TIMEOUT_S) -> MilvusServer:
    """Start a Milvus standalone server with its data under ``base_dir``; returns once a client can list
    its collections. Raises ``ServerUnavailable`` (with the server's log) when it cannot start."""
    if reason := unavailable_reason():
        raise ServerUnavailable(reason)
    import milvus

    began = time.monotonic()
    try:
        bin_dir = _binaries(milvus.__version__)
    except OSError as e:
        raise ServerUnavailable(f"cannot unpack the Milvus server binaries: {e}") from e
    base_dir.mkdir(parents=True, exist_ok=True)
    config = milvus.MilvusServerConfig(data_dir=str(base_dir))
    port_keys = sorted(key for key in config.configurable_items if key.endswith("_port"))
    names = [*port_keys, "metrics_port", "etcd_peer_port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config.update(**{key: ports[key] for key in port_keys})
    for key, value in TEST_CONFIG.items():
        config.set(key, value)
    config.resolve()  # checks the ports bind, writes base_dir/configs/milvus.yaml
    _use_etcd_ports(base_dir, ports["etcd_port"], ports["etcd_peer_port"])
    env = {
        **os.environ,
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(ports["metrics_port"]),
        "MILVUS_RUN_DIR": str(base_dir / "run"),
        "MILVUSCONF": str(base_dir / "configs"),
        "LD_LIBRARY_PATH": ":".join(p for p in (str(bin_dir), os.environ.get("LD_LIBRARY_PATH")) if p),
    }
    (base_dir / "logs").mkdir(exist_ok=True)
    with (
        (base_dir / "logs" / "milvus-stdout.log").open("wb") as out,
        (base_dir / "logs" / "milvus-stderr.log").open("wb") as err,
    ):
        process = subprocess.Popen(
            [str(bin_dir / "milvus"), "run", "standalone"],
            cwd=base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = MilvusServer(base_dir, ports["proxy_port"], ports["metrics_port"], process, ports=ports)
    try:
        _wait_ready(server, began + timeout)
    except BaseException:
        server.stop()
        raise
    server.start_s = time.monotonic() - began
    return server


def _use_etcd_ports(base_dir: Path, client_port: int, peer_port: int) -> None:
    """Point embedded etcd at free ports: an etcd config file, named by ``etcd.config.path`` (inserted
    under ``etcd:`` in the rendered milvus.yaml, whose template has no such key)."""
    etcd_yaml = base_dir / "configs" / "etcd.yaml"
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    etcd_yaml.write_text(
        "name: default\n"
        f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\n"
    )
    milvus_yaml = base_dir / "configs" / "milvus.yaml"
    lines = milvus_yaml.read_text().splitlines()
    at = lines.index("etcd:")
    lines[at + 1 : at + 1] = ["  config:", f"    path: {etcd_yaml}"]
    milvus_yaml.write_text("\n".join(lines) + "\n")


def _wait_ready(server: MilvusServer, deadline: float) -> None:
    health = f"http://127.0.0.1:{server.metrics_port}/healthz"
    while True:
        if not server.running:
            raise ServerUnavailable(
                f"the Milvus server exited with status {server.process.returncode} while starting:\n"
                + server.log_tail()
            )
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"the Milvus server was not ready in time:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                healthy = b"OK" in response.read()
        except (OSError, urllib.error.URLError):
            healthy = False
        if healthy:
            try:
                client = server.client()
                try:
                    client.list_collections()
                finally:
                    client.close()
                return
            except Exception:  # the proxy comes up a moment after the health endpoint
                pass
        time.sleep(0.2)


def drop_collections(server: MilvusServer, prefix: str) -> None:
    """Drop the collections whose name starts with ``prefix`` (one test's)."""
    client = server.client()
    try:
        for name in client.list_collections():
            if name.startswith(prefix):
                client.drop_collection(name)
    finally:
        client.close()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """One Milvus server for the test session (skips, with the reason, when it cannot start)."""
    try:
        server = start(tmp_path_factory.mktemp("milvus-server"))
    except ServerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def milvus_prefix(milvus_server: MilvusServer) -> Iterator[str]:
    """A collection prefix of this test's own on ``milvus_server``; its collections are dropped after."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield prefix
    if milvus_server.running:
        drop_collections(milvus_server, prefix)
