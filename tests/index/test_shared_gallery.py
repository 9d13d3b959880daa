"""The gallery replicas share (``index.shared_gallery``) over the real PostgreSQL and Milvus servers: two
handles are two replicas. The config is recorded by the first and checked by the others; what one adds
the other finds; a search never returns an id whose add is in flight (pending) or whose remove is half
done, and still fills ``k``; a filtered search is the brute-force oracle; image bytes come from
PostgreSQL; verify and repair see what a crash left."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from index.gallery_files import GalleryError
from index.metadata import NewItem, UnknownLabelError, content_hash
from index.shared_gallery import SharedGallery
from model.tasks import Fingerprints
from tests.index.conftest import DIM, MODEL_HASH, TASKS, Oracle, assert_matches_oracle, unit_vectors
from tests.milvus_server import MilvusServer

pytestmark = pytest.mark.cluster

LABELS: list[dict[str, int | str]] = [
    {"Male": 1, "colour": "green"},
    {"Male": 0, "colour": "green"},
    {"Male": 1, "colour": "red"},
    {},
]


def items(start: int, n: int) -> list[NewItem]:
    out = []
    for i in range(start, start + n):
        data = f"image {i}".encode()
        out.append(NewItem(f"{i}.png", content_hash(data), 4, 4, dict(LABELS[i % len(LABELS)]), data))
    return out


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([unit_vectors(rng, n) for _ in TASKS], axis=1)


Opener = Callable[..., SharedGallery]


@pytest.fixture
def open_replica(postgres_url: str, milvus_server: MilvusServer, milvus_prefix: str) -> Iterator[Opener]:
    opened: list[SharedGallery] = []
    url = f"{postgres_url}?schema={milvus_prefix}"  # the prefix defaults to the schema: the test's own

    def replica(**options: object) -> SharedGallery:
        settings: dict[str, object] = {
            "milvus_uri": milvus_server.uri,
            "create": True,
            "tasks": TASKS,
            "dim": DIM,
            "model_hash": MODEL_HASH,
            "repair_every_s": None,
        }
        gallery = SharedGallery.open(url, **{**settings, **options})  # type: ignore[arg-type]
        opened.append(gallery)
        return gallery

    yield replica
    for gallery in opened:
        gallery.close()


def test_the_first_replica_records_the_config_and_the_others_are_checked(open_replica: Opener) -> None:
    a = open_replica()
    b = open_replica(tasks=["Other"], dim=DIM)  # not created again: the recorded config wins
    assert b.tasks == TASKS and b.config == a.config
    assert a.config["store_options"]["collection_prefix"] == a.metadata.schema
    with pytest.raises(GalleryError, match="the run's model"):
        open_replica(model_hash="1" * 64)
    with pytest.raises(GalleryError, match="holds 8-dimensional vectors, the model makes 16"):
        open_replica(dim=16)
    with pytest.raises(GalleryError, match="collection prefix"):
        open_replica(collection_prefix="elsewhere")
    with pytest.raises(GalleryError, match="MODRET_MILVUS_URI"):
        open_replica(milvus_uri=None)


def test_an_empty_database_without_create_is_refused(postgres_url: str, milvus_server: MilvusServer) -> None:
    with pytest.raises(GalleryError, match="holds no gallery metadata"):
        SharedGallery.open(postgres_url, milvus_uri=milvus_server.uri)


def test_fingerprints_let_a_child_run_serve_its_old_tasks(open_replica: Opener) -> None:
    prints = Fingerprints("s" * 8, {task: f"d{task}" for task in TASKS})
    open_replica(fingerprints=prints)
    child = Fingerprints("s" * 8, {**prints.tasks, "New": "dnew"})
    other = open_replica(model_hash="2" * 64, fingerprints=child)
    assert other.task_check is not None and other.task_check.missing == ["New"]
    with pytest.raises(GalleryError, match="shared weights"):
        open_replica(model_hash="2" * 64, fingerprints=Fingerprints("x", child.tasks))


def test_adds_are_shared_and_searches_never_show_pending_or_half_removed_ids(open_replica: Opener) -> None:
    a, b = open_replica(), open_replica()
    vecs = vectors(12, 0)
    result = a.insert(items(0, 12), vecs)
    assert all(result.new) and b.metadata.count() == 12
    again = b.insert(items(10, 4), vectors(4, 1))  # two duplicates by content, across replicas
    assert again.ids[:2] == result.ids[10:] and again.new == [False, False, True, True]
    found = b.search(TASKS[0], vecs[:1, 0], 1)
    assert found.ids[0, 0] == result.ids[0]  # the self-match
    assert b.image_bytes(b.items([result.ids[0]])[result.ids[0]]) == b"image 0"
    # An add in flight elsewhere: pending rows whose vectors are stored, exactly like the query.
    in_flight = items(100, 1)
    (pending,), _ = a.metadata.add(in_flight, pending=True)
    by_task = {t: vecs[:1, j] for j, t in enumerate(TASKS)}
    a.store.add(np.array([pending]), by_task, labels=[in_flight[0].labels])
    # A remove half done: the row is gone, the vectors not yet.
    b.metadata.remove([result.ids[1]])
    for gallery in (a, b):
        hits = gallery.search(TASKS[0], vecs[:1, 0], 5).ids[0].tolist()
        assert pending not in hits and result.ids[1] not in hits and len(hits) == 5 and -1 not in hits
    assert b.items([pending]) == {}
    assert not b.verify().ok  # the orphan vectors of the half-done remove
    report = b.repair(older_than_s=0)
    assert report.committed == [pending] and report.orphans == [result.ids[1]]
    assert b.verify().ok, b.verify().problems
    assert b.remove([result.ids[0]]) == 1 and a.items([result.ids[0]]) == {}
    assert result.ids[0] not in a.search(TASKS[0], vecs[:1, 0], 3).ids[0]


def test_filtered_searches_run_in_milvus_and_match_the_brute_force_oracle(open_replica: Opener) -> None:
    a, b = open_replica(), open_replica()
    n = 40
    vecs = vectors(n, 3)
    ids = np.array(a.insert(items(0, n), vecs).ids, dtype=np.int64)
    oracle = Oracle()
    oracle.add(ids, {t: vecs[:, j] for j, t in enumerate(TASKS)})
    queries = vectors(3, 4)
    for conditions in ({"Male": 1}, {"colour": "green"}, {"Male": "1", "colour": "red"}, {"Male": 5}):
        allowed = b.metadata.matching(conditions)
        for j, task in enumerate(TASKS):
            for k in (1, 7, n):
                found = b.search(task, queries[:, j], k, conditions)
                assert_matches_oracle(found.ids, found.scores, oracle, task, queries[:, j], k, allowed)
    with pytest.raises(UnknownLabelError, match="nobody"):
        b.search(TASKS[0], queries[:, 0], 3, {"nobody": 1})
    assert b.verify().ok
    info = b.info()
    assert info.items == n and info.counts == {task: n for task in TASKS}


def test_a_crashed_add_is_rolled_back_by_the_repair_on_open(open_replica: Opener, tmp_path: Path) -> None:
    a = open_replica()
    (half,), _ = a.metadata.add(items(0, 1), pending=True)
    a.store._client.insert(  # the vectors reached the first task only, then the replica died
        a.store.collections[TASKS[0]], [{"id": half, "vector": vectors(1, 5)[0, 0].tolist(), "labels": {}}]
    )
    restarted = open_replica(repair_after_s=0)
    assert any("rolled back" in line for line in restarted.repairs)
    assert restarted.metadata.ids(include_pending=True).tolist() == []
    assert all(restarted.store.count(task) == 0 for task in TASKS)


def test_modret_index_repair_exit_codes(open_replica: Opener, postgres_url: str, milvus_prefix: str) -> None:
    from typer.testing import CliRunner

    from service.cli.index import index_app

    a = open_replica()
    ids = a.insert(items(0, 3), vectors(3, 6)).ids
    env = {"MODRET_METADATA_URL": f"{postgres_url}?schema={milvus_prefix}", "MODRET_MILVUS_URI": a.store.uri}
    runner = CliRunner()
    ok = runner.invoke(index_app, ["repair", "--verify-only"], env=env)
    assert ok.exit_code == 0 and "3 ids in each of 2 collections" in ok.output, ok.output
    a.metadata.remove([ids[0]])  # a delete that stopped after its row
    found = runner.invoke(index_app, ["repair", "--verify-only"], env=env)
    assert found.exit_code == 1 and "without a metadata row" in found.output, found.output
    fixed = runner.invoke(index_app, ["repair"], env=env)
    assert fixed.exit_code == 0 and "were removed" in fixed.output, fixed.output
    assert all(a.store.ids(task).tolist() == ids[1:] for task in TASKS)
    wrong = runner.invoke(index_app, ["repair", "--milvus-collection-prefix", "other"], env=env)
    assert wrong.exit_code == 2 and "collection prefix" in wrong.output, wrong.output


def test_modret_index_load_fills_the_shared_gallery_from_a_labelled_folder(
    run_dir: Path, postgres_url: str, milvus_server: MilvusServer, milvus_prefix: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from service.cli.index import index_app
    from tests.folders import write_shirts

    folder = write_shirts(tmp_path / "shirts", count=12)
    url = f"{postgres_url}?schema={milvus_prefix}"
    env = {"MODRET_METADATA_URL": url, "MODRET_MILVUS_URI": milvus_server.uri}
    args = ["load", "--run", str(run_dir), "--images", str(folder), "--device", "cpu"]
    first = CliRunner().invoke(index_app, args, env=env)
    assert first.exit_code == 0 and "12 images added (0 already there" in first.output, first.output
    again = CliRunner().invoke(index_app, args, env=env)  # the same contents: duplicates, by content hash
    assert again.exit_code == 0 and "0 images added (12 already there" in again.output, again.output
    gallery = SharedGallery.open(url, milvus_uri=milvus_server.uri, repair=False, repair_every_s=None)
    try:
        assert gallery.metadata.count() == 12 and gallery.verify().ok
        green = gallery.metadata.matching({"colour": "green"})
        first_id = int(gallery.metadata.ids()[0])
        query = gallery.vectors([first_id], gallery.tasks[0])
        found = gallery.search(gallery.tasks[0], query, 12, {"colour": "green"})
        assert set(found.ids[0][found.ids[0] >= 0].tolist()) == set(green.tolist()) and len(green) == 4
        record = gallery.items([first_id])[first_id]
        assert gallery.image_bytes(record) == (folder / record.source).read_bytes()
    finally:
        gallery.close()
