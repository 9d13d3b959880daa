"""A real PostgreSQL server for tests, from the distribution's packages (``apt-get install postgresql``).

``PostgresServer.start()`` runs ``initdb`` (trust authentication, superuser ``modret``) in a new temporary
directory and ``pg_ctl start`` on a free loopback port, with the server's Unix socket in that directory
too; ``stop()`` stops it and removes the directory. PostgreSQL refuses to run as root: when the tests run
as root, both commands run as the ``postgres`` user (``su postgres -c``) over a directory it owns, as the
Debian package sets up; otherwise they run as the current user. The server runs with ``fsync=off``: the
tests check behaviour, not the durability of PostgreSQL itself, and it makes ``CREATE DATABASE`` (one per
test) fast. It starts in about a second.

``PostgresUnavailable`` says why a server cannot start here (no binaries, no ``postgres`` user, initdb or
start failed) and how to fix it; the fixtures in ``tests/conftest.py`` turn it into a skip.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.processes import free_port

INSTALL_HINT = "install PostgreSQL's server binaries (`apt-get install postgresql`)"
USER = "modret"  # the superuser initdb creates; trust authentication, so no password


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and how to fix it."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``, else PATH's."""

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        bin_dir = Path(initdb).parent
        if (bin_dir / "pg_ctl").is_file():
            return bin_dir
    initdb_on_path, pg_ctl_on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb_on_path and pg_ctl_on_path:
        return Path(initdb_on_path).parent
    raise PostgresUnavailable(f"no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH: {INSTALL_HINT}")


_names = itertools.count()


@dataclass
class PostgresServer:
    directory: Path
    port: int
    bin_dir: Path
    as_postgres: bool  # run the binaries as the postgres user (the tests run as root)

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, attempts: int = 3) -> PostgresServer:
        bin_dir = find_bin_dir()
        as_postgres = os.geteuid() == 0
        if as_postgres:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no `postgres` user to run the server as: {INSTALL_HINT}, "
                    "which creates it, or run the tests as a non-root user"
                ) from None
        # Not under pytest's tmp_path: its folders are 0700 root's, which the postgres user cannot enter.
        directory = Path(tempfile.mkdtemp(prefix="modret-pg-"))
        if as_postgres:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        server = cls(directory, 0, bin_dir, as_postgres)
        try:
            server._run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-A", "trust", "-U", USER])
            for attempt in range(attempts):  # a free port can be taken before the server binds it
                server.port = free_port()
                try:
                    server.resume()
                    return server
                except PostgresUnavailable:
                    if attempt == attempts - 1:
                        raise
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        raise AssertionError("unreachable")

    def resume(self) -> None:
        """Start the server (again, on the same port and data)."""
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.directory / "log"), "-o", self._options())

    def pause(self) -> None:
        """Stop the server, keeping its data (``resume`` starts it again): a database outage."""
        self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60")

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args])

    def _run(self, command: list[str]) -> None:
        if self.as_postgres:
            command = ["su", "postgres", "-c", shlex.join(command)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.directory, timeout=120)
        if done.returncode != 0:
            log = self.directory / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise PostgresUnavailable(
                f"`{shlex.join(command)}` failed ({done.returncode}): "
                f"{done.stdout[-1000:]}{done.stderr[-2000:]}{tail}"
            )

    def create_database(self) -> str:
        """A new empty database (a copy of ``template1``, a few tens of ms); returns its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "60")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
