"""Serving a child run (issue 15) through the real server: a run task without an index is listed as not
indexed and refused by a search; ``modret index add-task`` then ``POST /admin/reload`` serves it; a
reload that cannot serve the gallery keeps the old state; a gallery task the run lacks refuses uploads; a
live service indexes the new task itself (``POST /admin/tasks/{task}/index``) while it takes uploads."""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from index.build import embed_images
from index.gallery import Gallery
from index.metadata import NewItem, content_hash
from model.run import load_run, save_run
from service.cli.index import index_app
from tests.factories import face, make_child_run, tiny_model
from tests.service.api.server import error_of, running_server, settings_for

NEW = "Bald"
ADMIN = {"X-API-Key": "admin-secret"}
READER = {"X-API-Key": "reader-secret"}


@pytest.fixture(scope="module")
def child_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_child_run(run_dir, tmp_path_factory.mktemp("child") / "run", NEW)


def upload(client: object, index: int, headers: dict[str, str]) -> object:
    data = face(100 + index)[0]
    return client.post(  # type: ignore[attr-defined]
        "/images", files=[("images", (f"new-{index}.png", data, "image/png"))], headers=headers
    )


def assert_the_new_task_finds_a_face_itself(client: object) -> dict[str, object]:
    """A gallery image searched under the new task is its own best match; returns that hit."""
    query = {"image": ("q.png", face(3)[0], "image/png")}
    found = client.post("/search", params={"task": NEW, "k": 3}, files=query)  # type: ignore[attr-defined]
    assert found.status_code == 200, found.text
    top: dict[str, object] = found.json()["results"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert client.get(f"/images/{top['id']}").json()["source"] == "face-3.png"  # type: ignore[attr-defined]
    return top


def test_a_child_run_serves_the_old_tasks_and_names_the_new_one_not_indexed(
    child_dir: Path, index_dir: Path
) -> None:
    with running_server(settings_for(child_dir, index_dir)) as server, server.client() as client:
        tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks[NEW]["indexed"] is False and tasks[NEW]["gallery_size"] == 0
        assert tasks[NEW]["accuracy"] == pytest.approx(0.77)
        assert tasks["Smiling"]["indexed"] is True and tasks["Smiling"]["gallery_size"] == 24
        response = client.post("/search", params={"task": "bald", "by_id": 1})
        body = error_of(response)
        assert response.status_code == 409 and body["error"] == "task_not_indexed"
        assert "modret index add-task" in body["message"] and body["details"]["task"] == NEW
        found = client.post("/search", params={"task": "Smiling", "by_id": 1, "explain": True})
        assert found.status_code == 200, found.text
        assert set(found.json()["results"][0]["similarities"]) == set(tasks) - {NEW}
        query = {"image": ("q.png", face(3)[0], "image/png")}
        found = client.post("/search", params={"task": "Smiling", "explain": True}, files=query)
        assert found.status_code == 200, found.text
        assert upload(client, 0, {}).status_code == 201  # stored under the indexed tasks


def test_add_task_then_reload_serves_the_new_task(
    run_dir: Path, child_dir: Path, index_dir: Path, tmp_path: Path
) -> None:
    current = tmp_path / "current"  # the run the service is told to serve: a symlink the operator moves
    current.symlink_to(run_dir)
    added = CliRunner().invoke(
        index_app,
        ["add-task", "--run", str(child_dir), "--index", str(index_dir), "--task", NEW, "--device", "cpu"],
    )
    assert added.exit_code == 0, added.output
    other = tmp_path / "other"
    save_run(other, tiny_model(seed=5, perturb=0.6))  # unrelated weights
    settings = settings_for(current, index_dir, api_key="reader-secret", admin_key="admin-secret")
    with running_server(settings) as server, server.client(headers=READER) as client:
        # The parent run: the gallery's Bald index is of no use to it, and it cannot embed uploads for it.
        assert NEW not in [t["name"] for t in client.get("/tasks").json()["tasks"]]
        refused = upload(client, 1, ADMIN)
        assert refused.status_code == 409 and error_of(refused)["error"] == "gallery_out_of_date"

        current.unlink()
        current.symlink_to(child_dir)
        assert client.post("/admin/reload").status_code == 403  # the reader key may not
        reloaded = client.post("/admin/reload", headers=ADMIN)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["tasks"][-1] == NEW and reloaded.json()["not_indexed"] == []

        tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks[NEW]["indexed"] and tasks[NEW]["gallery_size"] == 24
        assert tasks[NEW]["accuracy"] == pytest.approx(0.77)
        top = assert_the_new_task_finds_a_face_itself(client)
        assert upload(client, 2, ADMIN).status_code == 201  # embedded under every task, Bald too

        current.unlink()
        current.symlink_to(other)
        failed = client.post("/admin/reload", headers=ADMIN)
        body = error_of(failed)
        assert failed.status_code == 409 and body["error"] == "reload_failed"
        assert "shared weights" in body["message"] and "still serving" in body["message"]
        again = client.post(
            "/search", params={"task": NEW, "k": 3}, files={"image": ("q.png", face(3)[0], "image/png")}
        )  # the old state serves on
        assert again.status_code == 200 and again.json()["results"][0]["id"] == top["id"]


def _wait_for_job(client: object, task: str, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/admin/tasks/{task}/index", headers=ADMIN)  # type: ignore[attr-defined]
        assert status.status_code == 200, status.text
        body: dict[str, object] = status.json()
        if body["state"] != "running" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_a_live_service_indexes_a_new_task_while_it_takes_uploads(child_dir: Path, index_dir: Path) -> None:
    settings = settings_for(child_dir, index_dir, api_key="reader-secret", admin_key="admin-secret")
    with running_server(settings) as server, server.client(headers=READER) as client:
        none_yet = client.get(f"/admin/tasks/{NEW}/index", headers=ADMIN)
        assert none_yet.status_code == 404 and error_of(none_yet)["error"] == "no_indexing_job"
        assert client.post(f"/admin/tasks/{NEW}/index").status_code == 403  # the reader key may not
        unknown = client.post("/admin/tasks/Nope/index", headers=ADMIN)
        assert unknown.status_code == 404 and error_of(unknown)["error"] == "unknown_task"
        indexed = client.post("/admin/tasks/Smiling/index", headers=ADMIN)
        assert indexed.status_code == 409 and error_of(indexed)["error"] == "task_already_indexed"

        started = client.post(f"/admin/tasks/{NEW.lower()}/index", headers=ADMIN)  # any case, as searches
        assert started.status_code == 202, started.text
        assert started.json()["task"] == NEW and started.json()["total"] == 24
        uploaded = upload(client, 7, ADMIN)  # while the job runs (or just after): indexed under Bald too
        assert uploaded.status_code == 201, uploaded.text
        new_id = uploaded.json()["items"][0]["id"]
        done = _wait_for_job(client, NEW)
        assert done["state"] == "done", done
        # The upload was embedded by the job (stored before its end) or under every task by itself (after).
        assert done["embedded"] in (24, 25) and done["finished_at"]

        tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks[NEW]["indexed"] is True and tasks[NEW]["gallery_size"] == 25
        assert_the_new_task_finds_a_face_itself(client)
        by_new = client.post("/search", params={"task": NEW, "by_id": new_id, "explain": True})
        assert by_new.status_code == 200, by_new.text
        assert NEW in by_new.json()["results"][0]["similarities"]
        again = client.post(f"/admin/tasks/{NEW}/index", headers=ADMIN)
        assert again.status_code == 409 and error_of(again)["error"] == "task_already_indexed"

        assert client.delete(f"/admin/tasks/{NEW}/index").status_code == 403  # the reader key may not
        dropped = client.delete(f"/admin/tasks/{NEW.lower()}/index", headers=ADMIN)
        assert dropped.status_code == 200, dropped.text
        assert dropped.json()["task"] == NEW and dropped.json()["not_indexed"] == [NEW]
        refused = client.post("/search", params={"task": NEW, "by_id": new_id})
        assert refused.status_code == 409 and error_of(refused)["error"] == "task_not_indexed"
        assert upload(client, 8, ADMIN).status_code == 201  # stored under the tasks still indexed
        assert client.post(f"/admin/tasks/{NEW}/index", headers=ADMIN).status_code == 202  # anew
        assert _wait_for_job(client, NEW)["embedded"] == 26
        assert_the_new_task_finds_a_face_itself(client)

        def drop() -> httpx.Response:
            with server.client() as other:
                return other.delete(f"/admin/tasks/{NEW}/index", headers=ADMIN)

        with ThreadPoolExecutor(3) as pool:  # three drops at once: one drops, the others find it gone
            drops = sorted(pool.map(lambda _: drop(), range(3)), key=lambda r: r.status_code)
        assert [r.status_code for r in drops] == [200, 404, 404], [r.text for r in drops]
        assert {error_of(r)["error"] for r in drops[1:]} == {"no_task_index"}
        assert upload(client, 9, ADMIN).status_code == 201  # the gallery still takes writes
        assert client.post(f"/admin/tasks/{NEW}/index", headers=ADMIN).status_code == 202
        assert _wait_for_job(client, NEW)["embedded"] == 27
    verified = CliRunner().invoke(index_app, ["verify", str(index_dir), "--run", str(child_dir)])
    assert verified.exit_code == 0, verified.output  # every item under every task, the new one included


def test_a_gallery_without_its_images_cannot_be_indexed_live(
    run_dir: Path, child_dir: Path, tmp_path: Path
) -> None:
    parent = load_run(run_dir)
    root = tmp_path / "no-blobs"
    gallery = Gallery.create(
        root, tasks=parent.task_names, dim=parent.embedding_dim, model_hash=parent.model_hash,
        fingerprints=parent.fingerprints,
    )  # fmt: skip
    try:
        data, labels = face(0)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        item = NewItem("0.png", content_hash(data), image.width, image.height, labels, None)
        gallery.add([item], embed_images(parent, [image]))
    finally:
        gallery.close()
    settings = settings_for(child_dir, root, api_key="reader-secret", admin_key="admin-secret")
    with running_server(settings) as server, server.client(headers=ADMIN) as client:
        refused = client.post(f"/admin/tasks/{NEW}/index")
        body = error_of(refused)
        assert refused.status_code == 409 and body["error"] == "images_not_stored"
        assert "--images DIR" in body["message"] and body["details"]["images_not_stored"] == 1
        assert client.get(f"/admin/tasks/{NEW}/index").status_code == 404  # nothing was started


def test_dropping_a_task_the_run_lacks_lets_uploads_in_again(
    run_dir: Path, child_dir: Path, index_dir: Path
) -> None:
    added = CliRunner().invoke(
        index_app,
        ["add-task", "--run", str(child_dir), "--index", str(index_dir), "--task", NEW, "--device", "cpu"],
    )
    assert added.exit_code == 0, added.output
    settings = settings_for(run_dir, index_dir, api_key="reader-secret", admin_key="admin-secret")
    with running_server(settings) as server, server.client(headers=ADMIN) as client:
        refused = upload(client, 3, ADMIN)  # the parent run cannot embed under the gallery's Bald
        assert refused.status_code == 409 and error_of(refused)["error"] == "gallery_out_of_date"
        unknown = client.delete("/admin/tasks/Nope/index")
        assert unknown.status_code == 404 and error_of(unknown)["error"] == "unknown_task"
        dropped = client.delete(f"/admin/tasks/{NEW}/index")
        assert dropped.status_code == 200, dropped.text
        assert NEW not in dropped.json()["tasks"] and dropped.json()["not_indexed"] == []
        assert upload(client, 3, ADMIN).status_code == 201
    verified = CliRunner().invoke(index_app, ["verify", str(index_dir), "--run", str(run_dir)])
    assert verified.exit_code == 0, verified.output


def test_a_search_in_flight_across_a_reload_is_served_and_the_old_worker_then_stops(
    run_dir: Path, index_dir: Path
) -> None:
    settings = settings_for(run_dir, index_dir, admin_key="admin-secret")
    boundary = "modret-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + face(7)[0]
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /search?task=Smiling&k=3 HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running_server(settings) as server, server.client(headers=ADMIN) as client:
        old = server.app.state.modret.loaded
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(head + body[:100])  # admitted on the old run; its upload still arriving
            time.sleep(0.2)
            assert client.post("/admin/reload").status_code == 200
            assert server.app.state.modret.loaded is not old
            conn.sendall(body[100:])
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 2:
                part = conn.recv(65536)
                assert part, answer
                answer += part
        assert answer.startswith(b"HTTP/1.1 200"), answer[:400]
        deadline = time.monotonic() + 20
        while old.batcher.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not old.batcher.running and not server.app.state.modret.retired  # retired once it ended
        assert (
            client.post(
                "/search", params={"task": "Smiling"}, files={"image": ("q.png", face(8)[0])}
            ).status_code
            == 200
        )
