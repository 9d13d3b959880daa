"""Acknowledged writes survive SIGKILL of a real ``modret serve`` process, a full disk refuses writes with
507 until space is freed, and a damaged or read-only gallery is refused with one line.

``modret serve`` runs in a subprocess on a free loopback port over a copy of the ``index_dir`` fixture.
The kill loop adds (new images, and the same bytes twice at once: the duplicate's answer names the
original's id), deletes what it added, and SIGKILLs the server at a random moment; after each restart
every acknowledged add (duplicates included) must be there and every acknowledged delete gone, and
``modret index verify`` beside the live service finds no problem. The full loop (≥ 100 kills) is
``benchmarks/write_bench.py --crash-kills``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from service.cli.index import index_app
from tests.factories import face
from tests.service.api.server import error_of, free_socket
from tests.volumes import small_volume

KILLS = 3
runner = CliRunner()


def serve_command(run_dir: Path, index_dir: Path) -> list[str]:
    modret = Path(sys.executable).with_name("modret")  # the console script beside this interpreter
    return [str(modret), "serve", "--run", str(run_dir), "--index", str(index_dir)]


@contextmanager
def serving(
    run_dir: Path, index_dir: Path, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """``modret serve`` in a subprocess, ready; killed (SIGKILL) afterwards if it still runs. Its output
    goes to ``log`` (default: beside the index)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "MODRET_WARMUP": "false", "MODRET_MAX_WAIT_MS": "1"}
    logs = (log or index_dir.with_name(f"{index_dir.name}-serve.log")).open("ab")
    process = subprocess.Popen(
        [*serve_command(run_dir, index_dir), "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=logs,
        stderr=logs,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                tail = Path(logs.name).read_text(errors="replace")[-2000:]
                raise AssertionError(f"modret serve exited: {tail}")
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "modret serve did not become ready"
            time.sleep(0.05)
        yield process, client
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        logs.close()


@dataclass
class Ledger:
    """What the server acknowledged: added id per content, deleted ids, and deletes in doubt (the server
    was killed before it answered, so the delete may or may not have committed)."""

    added: dict[int, int] = field(default_factory=dict)  # face index -> id
    deleted: set[int] = field(default_factory=set)
    in_doubt: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def add(client: httpx.Client, ledger: Ledger, index: int) -> int | None:
    data = face(index)[0]
    try:
        response = client.post("/images", files={"images": (f"f{index}.png", data, "image/png")})
    except httpx.TransportError:
        return None  # killed before it answered: not acknowledged
    assert response.status_code == 201, response.text
    item_id = int(response.json()["items"][0]["id"])
    with ledger.lock:
        assert ledger.added.setdefault(index, item_id) == item_id
    return item_id


def pick_victim(ledger: Ledger, rng: random.Random) -> int | None:
    """An acknowledged add neither deleted nor being deleted, marked in doubt until its delete answers."""
    with ledger.lock:
        victims = sorted(set(ledger.added.values()) - ledger.deleted - ledger.in_doubt)
        if not victims:
            return None
        victim = rng.choice(victims)
        ledger.in_doubt.add(victim)
        return victim


def writer(
    client: httpx.Client, ledger: Ledger, first: int, stop: threading.Event, rng: random.Random
) -> None:
    n = first
    while not stop.is_set():
        n += 1
        roll = rng.random()
        if roll < 0.2:  # the same bytes twice at once: both answers name one id, which must be durable
            threads = [threading.Thread(target=add, args=(client, ledger, n)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elif roll < 0.45 and (victim := pick_victim(ledger, rng)) is not None:
            try:
                response = client.delete(f"/images/{victim}")
            except httpx.TransportError:
                return  # killed before it answered: the delete stays in doubt until the next check
            with ledger.lock:
                ledger.in_doubt.discard(victim)
                if response.status_code == 200:
                    ledger.deleted.add(victim)
        elif add(client, ledger, n) is None:
            return


def check(client: httpx.Client, ledger: Ledger) -> None:
    """Every acknowledged add is there and every acknowledged delete gone; a delete in doubt is settled by
    what the restarted server says (either answer is allowed, but it must then stay that way)."""
    for item_id in sorted(ledger.in_doubt):
        status = client.get(f"/images/{item_id}").status_code
        assert status in (200, 404), f"a delete in doubt of {item_id} left it answering {status}"
        if status == 404:
            ledger.deleted.add(item_id)
    ledger.in_doubt.clear()
    for item_id in ledger.added.values():
        status = client.get(f"/images/{item_id}").status_code
        expected = 404 if item_id in ledger.deleted else 200
        assert status == expected, f"acknowledged {'delete' if expected == 404 else 'add'} of {item_id} lost"


def test_sigkill_loses_no_acknowledged_write(run_dir: Path, index_dir: Path) -> None:
    ledger = Ledger()
    rng = random.Random(13)
    for round_ in range(KILLS):
        with serving(run_dir, index_dir) as (process, client):
            check(client, ledger)
            stop = threading.Event()
            writers = [
                threading.Thread(target=writer, args=(client, ledger, 10_000 * (round_ * 2 + w), stop, rng))
                for w in range(2)
            ]
            for thread in writers:
                thread.start()
            time.sleep(rng.uniform(0.3, 1.2))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            stop.set()
            for thread in writers:
                thread.join(timeout=30)
    assert len(ledger.added) > 2 * KILLS and ledger.deleted, "too few writes for the test to mean anything"
    with serving(run_dir, index_dir) as (_, client):
        check(client, ledger)
        result = runner.invoke(index_app, ["verify", str(index_dir)])  # beside the live service
        assert result.exit_code == 0, result.output
        assert "problem" not in result.output


def test_verify_beside_the_service_after_add_delete_kill_restart(run_dir: Path, index_dir: Path) -> None:
    with serving(run_dir, index_dir) as (process, client):
        item_id = add(client, Ledger(), 77_000)
        assert client.delete(f"/images/{item_id}").status_code == 200
        process.send_signal(signal.SIGKILL)
    with serving(run_dir, index_dir) as (_, client):
        assert client.get(f"/images/{item_id}").status_code == 404
        result = runner.invoke(index_app, ["verify", str(index_dir)])
        assert result.exit_code == 0, result.output


def garble_sqlite_header(index_dir: Path) -> None:
    path = index_dir / "gallery.sqlite"
    with open(path, "r+b") as f:
        f.write(b"this is no sqlite")


def truncate_sqlite(index_dir: Path) -> None:
    os.truncate(index_dir / "gallery.sqlite", 0)


def garbage_config(index_dir: Path) -> None:
    (index_dir / "gallery.json").write_text("{not json")


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (garble_sqlite_header, "gallery.sqlite"),
        (truncate_sqlite, "gallery.sqlite"),
        (garbage_config, "gallery.json"),
    ],
    ids=["sqlite-header", "sqlite-emptied", "config-garbage"],
)
def test_a_damaged_gallery_is_refused_in_one_line(run_dir: Path, index_dir: Path, damage, names: str) -> None:
    before = sorted(p.name for p in (index_dir / "store").rglob("*"))
    damage(index_dir)
    served = subprocess.run(
        serve_command(run_dir, index_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 2, served.stderr
    lines = [line for line in served.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in served.stderr, served.stderr
    assert names in lines[0] and "modret index recover" in lines[0]
    verified = runner.invoke(index_app, ["verify", str(index_dir)])
    assert verified.exit_code == 1  # a problem found, reported: not a crash
    assert verified.exception is None or isinstance(verified.exception, SystemExit)
    assert names in verified.output and "Traceback" not in verified.output
    assert sorted(p.name for p in (index_dir / "store").rglob("*")) == before  # nothing deleted
    recovered = runner.invoke(index_app, ["recover", str(index_dir)])
    assert recovered.exit_code == 0, recovered.output
    assert runner.invoke(index_app, ["verify", str(index_dir)]).exit_code == 0


def test_a_full_disk_answers_507_searches_go_on_and_writes_resume_once_freed(
    run_dir: Path, index_dir: Path, tmp_path: Path
) -> None:
    with small_volume(tmp_path / "vol", "16m") as volume:
        index = volume.root / "index"
        shutil.copytree(index_dir, index)
        (index / "writer.lock").unlink(missing_ok=True)
        with serving(run_dir, index, log=tmp_path / "serve.log") as (_, client):
            first = client.post("/images", files={"images": ("a.png", face(900)[0], "image/png")})
            assert first.status_code == 201, first.text
            first_id = first.json()["items"][0]["id"]
            volume.fill(leave=4096)
            refused = client.post("/images", files={"images": ("b.png", face(901, size=256)[0], "image/png")})
            assert refused.status_code == 507, refused.text
            body = error_of(refused)
            assert body["error"] == "insufficient_storage" and "free disk space" in body["message"]
            assert int(refused.headers["retry-after"]) > 0
            deleted = client.delete(f"/images/{first_id}")  # SQLite may still have room for a delete
            assert deleted.status_code in (200, 507), deleted.text
            searched = client.post(
                "/search",
                params={"task": "Smiling", "k": 2},
                files={"image": ("q.png", face(3)[0], "image/png")},
            )
            assert searched.status_code == 200, searched.text
            assert client.get("/v2/health/ready").status_code == 200
            volume.free()
            again = client.post("/images", files={"images": ("b.png", face(901, size=256)[0], "image/png")})
            assert again.status_code == 201, again.text  # room again: no restart needed
            second_id = again.json()["items"][0]["id"]
        with serving(run_dir, index, log=tmp_path / "serve.log") as (_, client):
            assert client.get(f"/images/{second_id}").status_code == 200
            assert client.get(f"/images/{first_id}").status_code == (
                404 if deleted.status_code == 200 else 200
            )
        result = runner.invoke(index_app, ["verify", str(index)])
        assert result.exit_code == 0, result.output


def test_a_read_only_gallery_is_refused_in_one_line_and_still_reads(
    run_dir: Path, index_dir: Path, tmp_path: Path
) -> None:
    """Said as what it is, not as a damaged database (SQLite cannot open its WAL there), and nothing
    suggests a recovery; the read-only commands read it as it is."""
    with small_volume(tmp_path / "vol", "64m") as volume:
        index = volume.root / "index"
        shutil.copytree(index_dir, index)
        (index / "writer.lock").unlink(missing_ok=True)
        volume.read_only()
        served = subprocess.run(serve_command(run_dir, index), capture_output=True, text=True, timeout=120)
        assert served.returncode == 2, served.stderr
        lines = [line for line in served.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in served.stderr, served.stderr
        assert "not writable" in lines[0] and "recover" not in lines[0]
        for command in ("info", "verify"):
            result = runner.invoke(index_app, [command, str(index)])
            assert result.exit_code == 0, result.output
