"""The gallery routes: add (one or many, labels, duplicates), read, content, list, delete; persisted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from index.build import build_gallery, dataset_source
from index.gallery import Gallery
from model.run import load_run
from tests.factories import IMAGE_SIZE, encode, face, stored_blob
from tests.service.api.server import error_of, running_server, settings_for


def test_add_read_list_delete_and_persist(run_dir: Path, index_dir: Path) -> None:
    new_a, new_b = face(1000)[0], face(1001)[0]
    existing = face(2)[0]  # gallery item 3
    with running_server(settings_for(run_dir, index_dir)) as server, server.client() as client:
        files = [
            ("images", ("a.png", new_a, "image/png")),
            ("images", ("b.png", new_b, "image/png")),
            ("images", ("dup.png", existing, "image/png")),
            ("images", ("a-again.png", new_a, "image/png")),
        ]
        labels = [("labels", json.dumps({"Smiling": 1, "Male": 0}))]
        added = client.post("/images", files=files, data=dict(labels))
        assert added.status_code == 201, added.text
        items = added.json()["items"]
        assert [i["duplicate"] for i in items] == [False, False, True, True]
        assert items[2]["id"] == 3 and items[3]["id"] == items[0]["id"]
        new_id = items[0]["id"]
        # durable through the write-ahead log: an add no longer writes a generation of its own
        assert added.json()["index_generation"] == 1

        info = client.get(f"/images/{new_id}").json()
        assert info["labels"] == {"Male": 0, "Smiling": 1}
        assert info["source"] == "a.png" and info["width"] == 48
        content = client.get(f"/images/{new_id}/content")
        assert content.content == new_a and content.headers["content-type"] == "image/png"
        assert content.headers["x-content-type-options"] == "nosniff"

        page = client.get("/images", params={"offset": 20, "limit": 10}).json()
        assert page["total"] == 26 and [i["id"] for i in page["items"]] == [21, 22, 23, 24, 25, 26]

        # the new image is searchable at once, and label filters see its labels
        hits = client.post("/search", params=[("task", "Smiling"), ("k", "1"), ("filter", "Male:0")],
                           files={"image": ("q.png", new_a, "image/png")}).json()["results"]  # fmt: skip
        assert [h["id"] for h in hits] == [new_id]

        assert client.delete("/images/5").json() == {"id": 5, "deleted": True}
        assert error_of(client.delete("/images/5"))["status"] == 404
        assert client.get("/images/5").status_code == 404
        assert client.get("/images/5/content").status_code == 404
        found = client.post(
            "/search",
            params={"task": "Smiling", "k": 100},
            files={"image": ("q.png", face(4)[0], "image/png")},
        )
        assert 5 not in [h["id"] for h in found.json()["results"]]
        assert client.get("/tasks/Smiling").json()["gallery_size"] == 25

    reopened = Gallery.open(index_dir)  # after a graceful stop: the adds and the delete are on disk
    try:
        assert reopened.metadata.count() == 25
        assert all(reopened.store.count(t) == 25 for t in reopened.tasks)
        assert 5 not in reopened.metadata.ids().tolist()
    finally:
        reopened.close()


def test_label_names_survive_upload_filter_and_display(run_dir: Path, index_dir: Path) -> None:
    """A category's name is stored, shown and filtered as the uploader spelt it; integers stay integers."""
    green, red = face(1100)[0], face(1101)[0]
    with running_server(settings_for(run_dir, index_dir)) as server, server.client() as client:
        ids = []
        for data, colour in ((green, "green"), (red, "dark red")):
            labels = json.dumps({"colour": colour, "Smiling": "1"})
            added = client.post(
                "/images", files=[("images", ("x.png", data, "image/png"))], data={"labels": labels}
            )
            assert added.status_code == 201, added.text
            ids.append(added.json()["items"][0]["id"])
        assert client.get(f"/images/{ids[0]}").json()["labels"] == {"Smiling": 1, "colour": "green"}

        def search(*filters: str) -> list[int]:
            response = client.post(
                "/search",
                params=[("task", "Smiling"), ("k", "50"), *(("filter", f) for f in filters)],
                files={"image": ("q.png", green, "image/png")},
            )
            assert response.status_code == 200, response.text
            return [h["id"] for h in response.json()["results"]]

        assert search("colour:green") == [ids[0]]
        assert search("colour:dark red") == [ids[1]]
        assert search("colour:blue") == []
        assert set(search("colour:green", "Smiling:1")) == {ids[0]}
        hits = client.post("/search", params={"task": "Smiling", "k": 1, "filter": "colour:green"},
                           files={"image": ("q.png", green, "image/png")}).json()["results"]  # fmt: skip
        assert hits[0]["labels"] == {"Smiling": 1, "colour": "green"}
        page = client.get("/images", params={"offset": 24, "limit": 5}).json()["items"]
        assert [i["labels"]["colour"] for i in page] == ["green", "dark red"]

        for bad in ("colour:", "colour:a\x01b", "colour:" + "x" * 201):
            response = client.post(
                "/search",
                params={"task": "Smiling", "filter": bad},
                files={"image": ("q.png", green, "image/png")},
            )
            assert response.status_code == 422, (bad, response.text)
            assert "filter" in error_of(response)["message"]


def test_labels_sent_as_a_file_are_kept_and_control_characters_leave_the_name(
    run_dir: Path, index_dir: Path
) -> None:
    with running_server(settings_for(run_dir, index_dir)) as server, server.client() as client:
        added = client.post(
            "/images",
            files=[
                ("images", ("a\x1b[31mred\u202e.png", face(1200)[0], "image/png")),
                ("labels", ("labels.json", b'{"colour": "green", "Smiling": 1}', "application/json")),
            ],
        )  # curl -F images=@... -F labels=@labels.json
        assert added.status_code == 201, added.text
        record = client.get(f"/images/{added.json()['items'][0]['id']}").json()
        assert record["labels"] == {"Smiling": 1, "colour": "green"}
        assert record["source"] == "a_[31mred_.png"


def test_bad_gallery_uploads(run_dir: Path, index_dir: Path) -> None:
    with (
        running_server(settings_for(run_dir, index_dir, max_upload_files=2)) as server,
        server.client() as client,
    ):
        png = face(1)[0]
        cases = [
            ({"files": [("images", ("t.jpg", b"text", "image/jpeg"))]}, 415),
            ({"files": [("images", ("e.png", b"", "image/png"))]}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": "[1]"}}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a b": 1}'}}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a": 1.5}'}}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a": ""}'}}, 400),
            (
                {"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a": "x\\u0000"}'}},
                400,
            ),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a": 1e400}'}}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))], "data": {"labels": '{"a": [1]}'}}, 400),
            ({"files": [("images", ("x.png", png, "image/png"))] * 3}, 413),
            ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415),
            ({"files": [("other", ("x.png", png, "image/png"))]}, 400),
            ({"files": [("images", (None, png))]}, 400),  # no filename: read as text, its bytes lost
            ({"files": [("images", ("x.png", png, "image/png")), ("labels", ("l.json", b"\xff{"))]}, 400),
        ]
        for kwargs, status in cases:
            response = client.post("/images", **kwargs)  # type: ignore[arg-type]
            assert response.status_code == status, (kwargs.keys(), response.text)
            error_of(response)
        assert client.get("/images").json()["total"] == 24
        assert client.get("/images/999999").status_code == 404
        assert client.get("/images", params={"limit": 0}).status_code == 422


def test_a_dataset_built_gallery_serves_its_images(run_dir: Path, tmp_path: Path) -> None:
    """``modret index build --dataset`` (as the demo builds its gallery) keeps the images' bytes: search
    results link them and ``/images/{id}/content`` serves them."""
    source = dataset_source("synthfaces", image_size=IMAGE_SIZE, num_images=8)
    build_gallery(load_run(run_dir), source, tmp_path / "index")
    faces = [item.image for item in dataset_source("synthfaces", image_size=IMAGE_SIZE, num_images=8).items]
    with running_server(settings_for(run_dir, tmp_path / "index")) as server, server.client() as client:
        found = client.post("/search", params={"task": "Smiling", "k": 3}, files={"image": encode(faces[4])})
        assert found.status_code == 200, found.text
        best = found.json()["results"][0]
        assert best["id"] == 5 and best["image_url"] == "/images/5/content"
        content = client.get(best["image_url"])
        assert content.status_code == 200 and content.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(content.content)) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(faces[4]))
        assert client.get("/images/1").json()["image_url"] == "/images/1/content"


def test_a_lost_image_file_is_a_404_that_says_so(run_dir: Path, tmp_path: Path) -> None:
    """An item whose kept bytes were deleted from the gallery's blobs (by hand, a bad restore) still
    searches; its content is a 404 that says the bytes are missing, not that they were never kept."""
    build_gallery(
        load_run(run_dir), dataset_source("synthfaces", image_size=IMAGE_SIZE, num_images=4), tmp_path / "i"
    )
    gallery = Gallery.open(tmp_path / "i")
    try:
        blob = stored_blob(gallery, gallery.metadata.get([2])[2])
    finally:
        gallery.close()
    assert blob is not None
    blob.unlink()
    with running_server(settings_for(run_dir, tmp_path / "i")) as server, server.client() as client:
        lost = client.get("/images/2/content")
        assert lost.status_code == 404
        body = error_of(lost)
        assert body["error"] == "no_image_content" and "missing" in body["message"]
        assert client.get("/images/3/content").status_code == 200
        assert client.post("/search", params={"task": "Smiling", "by_id": 2}).status_code == 200
