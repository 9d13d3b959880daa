"""Serving a child run (issue 15) through the real server: a run task without an index is listed as not
indexed and refused by a search; ``modret index add-task`` then ``POST /admin/reload`` serves it; a
reload that cannot serve the gallery keeps the old state; a gallery task the run lacks refuses uploads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.run import save_run
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
        query = {"image": ("q.png", face(3)[0], "image/png")}  # a gallery image: its own best match
        found = client.post("/search", params={"task": NEW, "k": 3}, files=query)
        assert found.status_code == 200, found.text
        top = found.json()["results"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
        assert client.get(f"/images/{top['id']}").json()["source"] == "face-3.png"
        assert upload(client, 2, ADMIN).status_code == 201  # embedded under every task, Bald too

        current.unlink()
        current.symlink_to(other)
        failed = client.post("/admin/reload", headers=ADMIN)
        body = error_of(failed)
        assert failed.status_code == 409 and body["error"] == "reload_failed"
        assert "shared weights" in body["message"] and "still serving" in body["message"]
        again = client.post("/search", params={"task": NEW, "k": 3}, files=query)  # the old state serves on
        assert again.status_code == 200 and again.json()["results"][0]["id"] == top["id"]
