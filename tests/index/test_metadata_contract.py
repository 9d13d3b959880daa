"""The metadata contract (``index.metadata_contract``), run unchanged against SQLite and PostgreSQL.

``sqlite`` is ``index.metadata.Metadata`` in a temporary gallery directory; ``postgres`` is
``index.postgres_metadata.PostgresMetadata`` over a fresh database of the session's real PostgreSQL
server (``tests/postgres_server.py``; marker ``cluster``, skipped with the reason where no server can
start). After the shared suite: what only the shared backend has (pending/committed items, the gallery
config, schemas side by side in one database, several processes adding at once, refusals).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from index.metadata import Metadata, MetadataError, NewItem, UnknownLabelError, content_hash
from index.metadata_contract import MetadataStore, open_metadata
from tests.postgres_server import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.cluster)]
Opener = Callable[[], MetadataStore]


def item(n: int, labels: dict[str, int | str] | None = None, data: bool = True, source: str = "") -> NewItem:
    """Item ``n``: its content (and so its hash) depends on ``n`` alone."""
    payload = f"image-{n}".encode() * 3
    return NewItem(
        source=source or f"img/{n}.png",
        content_hash=content_hash(payload),
        width=10 + n,
        height=20 + n,
        labels=dict(labels or {}),
        data=payload if data else None,
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def opener(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    """Opens the same (initially empty) metadata anew on each call; every handle is closed at the end."""
    opened: list[MetadataStore] = []
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None

    def open_() -> MetadataStore:
        store = open_metadata(url, tmp_path / "gallery", create=True)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> MetadataStore:
    return opener()


# --- the contract, on both backends --------------------------------------------------------------------


def test_add_get_ids_count(store: MetadataStore) -> None:
    items = [item(1, {"Male": 1}), item(2, {"Male": 0, "Smiling": 1}), item(3, data=False)]
    ids, new = store.add(items)
    assert new == [True, True, True]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    assert store.count() == 3
    assert store.ids().tolist() == ids and store.ids().dtype == np.int64
    records = store.get([*ids, 10**9])
    assert sorted(records) == ids  # an unknown id is simply absent
    for i, it in zip(ids, items, strict=True):
        record = records[i]
        assert (record.id, record.source, record.content_hash) == (i, it.source, it.content_hash)
        assert (record.width, record.height, record.labels) == (it.width, it.height, it.labels)
        assert record.has_blob == (it.data is not None)
        assert record.added_at.endswith("+00:00") and "T" in record.added_at
    assert store.get([]) == {}
    assert store.get(np.array(ids[:1], dtype=np.int64)).keys() == {ids[0]}


def test_duplicates_by_content_hash(store: MetadataStore) -> None:
    (first,), _ = store.add([item(1)])
    again = item(1, {"Male": 1}, source="another/name.png")  # same bytes, other name and labels
    ids, new = store.add([again, item(2), item(2), item(1)])
    assert ids[0] == ids[3] == first and ids[1] == ids[2] != first
    assert new == [False, True, False, False]  # the first occurrence of new content is the new one
    assert store.count() == 2
    kept = store.get([first])[first]
    assert kept.source == "img/1.png" and kept.labels == {}  # the duplicate changed nothing
    assert store.ids_by_hash(
        [item(1).content_hash, item(2).content_hash, "f" * 64, item(1).content_hash]
    ) == {
        item(1).content_hash: (first, True),
        item(2).content_hash: (ids[1], True),
    }


def test_remove_and_ids_are_never_handed_out_again(store: MetadataStore) -> None:
    ids, _ = store.add([item(1), item(2), item(3)])
    assert store.remove([ids[1], 10**9]) == 1
    assert store.remove([]) == 0
    assert store.ids().tolist() == [ids[0], ids[2]] and store.count() == 2
    assert store.get([ids[1]]) == {}
    assert store.ids_by_hash([item(2).content_hash]) == {}
    assert store.remove(np.array([ids[2]], dtype=np.int64)) == 1
    (back,), (is_new,) = store.add([item(2)])  # the removed content comes back as a new item
    (other,), _ = store.add([item(4)])
    assert is_new and back > ids[2] and other > back


def test_labels_and_matching(store: MetadataStore) -> None:
    ids, _ = store.add(
        [
            item(1, {"Male": 1, "Smiling": 1}),
            item(2, {"Male": 1, "Smiling": 0}),
            item(3, {"Male": 0, "Smiling": 1, "Eyeglasses": 1}),
            item(4),
        ]
    )
    assert store.label_names() == ["Eyeglasses", "Male", "Smiling"]
    assert store.matching({"Male": 1}).tolist() == ids[:2]
    assert store.matching({"Male": 1, "Smiling": 1}).tolist() == [ids[0]]
    assert store.matching({"Male": 0, "Smiling": 0}).tolist() == []
    assert store.matching({"Male": np.int64(0)}).tolist() == [ids[2]]
    assert store.matching({}).tolist() == ids  # no condition: every item
    assert store.matching({"Male": 1}).dtype == np.int64
    with pytest.raises(UnknownLabelError, match=r"'Bald'.*known labels: Eyeglasses, Male, Smiling"):
        store.matching({"Male": 1, "Bald": 1})
    store.remove([ids[2]])  # the only item with Eyeglasses
    assert store.label_names() == ["Male", "Smiling"]
    with pytest.raises(UnknownLabelError):
        store.matching({"Eyeglasses": 1})


def test_text_label_values(store: MetadataStore) -> None:
    """A label value is an int or a text (a category name); a text that spells an integer is that integer
    (``model.data.base.as_label_value``), so ``1`` and ``"1"`` are one value on both backends."""
    ids, _ = store.add(
        [
            item(1, {"colour": "green", "Male": 1}),
            item(2, {"colour": "red", "Male": "1"}),
            item(3, {"colour": " green ", "size": "10"}),
            item(4, {"colour": "Green", "size": 10}),
        ]
    )
    records = store.get(ids)
    assert records[ids[0]].labels == {"colour": "green", "Male": 1}
    assert records[ids[1]].labels == {"colour": "red", "Male": 1}
    assert records[ids[2]].labels == {"colour": "green", "size": 10}
    assert store.matching({"colour": "green"}).tolist() == [ids[0], ids[2]]
    assert store.matching({"colour": "Green"}).tolist() == [ids[3]]  # values are case-sensitive
    assert store.matching({"Male": 1}).tolist() == store.matching({"Male": "1"}).tolist() == ids[:2]
    assert store.matching({"size": "10"}).tolist() == [ids[2], ids[3]]
    assert store.matching({"colour": "green", "size": 10}).tolist() == [ids[2]]
    assert store.matching({"colour": "blue"}).tolist() == []
    assert store.label_names() == ["Male", "colour", "size"]


def test_blobs(store: MetadataStore) -> None:
    with_bytes, without = item(1), item(2, data=False)
    ids, _ = store.add([with_bytes, without])
    assert store.read_blob(with_bytes.content_hash) == with_bytes.data
    assert store.read_blob(without.content_hash) is None
    assert store.read_blob("0" * 64) is None
    # The same content uploaded later with its bytes gives the item its blob.
    (again,), (is_new,) = store.add([item(2)])
    assert again == ids[1] and not is_new
    assert store.get([again])[again].has_blob
    assert store.read_blob(without.content_hash) == item(2).data
    assert store.ids_by_hash([without.content_hash]) == {without.content_hash: (again, True)}
    # store_blobs keeps bytes before any row refers to them (and keeps what is there).
    store.store_blobs([item(3), item(4, data=False)])
    assert store.read_blob(item(3).content_hash) == item(3).data
    assert store.read_blob(item(4).content_hash) is None
    store.store_blobs([item(3)])
    # A removed item's bytes stay: the same content may come back.
    store.remove([ids[0]])
    assert store.read_blob(with_bytes.content_hash) == with_bytes.data


def test_reopening_keeps_everything(opener: Opener) -> None:
    first = opener()
    ids, _ = first.add([item(1, {"Male": 1, "colour": "green"}), item(2, {"Male": 0})])
    first.remove([ids[1]])
    before = first.get(ids)
    first.close()
    second = opener()
    assert second.get(ids) == before
    assert second.ids().tolist() == [ids[0]] and second.count() == 1
    assert second.matching({"colour": "green"}).tolist() == [ids[0]]
    assert second.read_blob(item(1).content_hash) == item(1).data
    assert second.quick_check() == "ok"
    (third,), _ = second.add([item(3)])
    assert third > ids[1]


def test_many_ids_at_once(store: MetadataStore) -> None:
    """Lookups by id and by hash past SQLite's bound-parameter chunk (500)."""
    items = [item(n, {"even": n % 2}, data=False) for n in range(1200)]
    ids, new = store.add(items)
    assert all(new) and store.count() == 1200
    assert sorted(store.get(ids)) == ids
    assert len(store.ids_by_hash([it.content_hash for it in items])) == 1200
    assert store.matching({"even": 0}).tolist() == ids[::2]
    assert store.remove(np.array(ids[:700])) == 700
    assert store.ids().tolist() == ids[700:]


def test_concurrent_adds_of_the_same_content_get_one_id(backend: str, opener: Opener) -> None:
    """Threads add overlapping batches (in different orders) at once: one id per content, exactly one
    call reports it new, and every call agrees. PostgreSQL: one handle per thread, as replicas have;
    SQLite: one shared handle (a SQLite gallery has one writer process, behind the gallery's flock)."""
    shared = opener()
    threads_n, rounds = 4, 5
    handles = [shared] * threads_n if backend == "sqlite" else [opener() for _ in range(threads_n)]
    results: list[list[tuple[list[int], list[bool], list[NewItem]]]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            barrier.wait()
            for r in range(rounds):
                batch = [item(n, {"round": r}) for n in rng.permutation(range(r * 10, r * 10 + 20))]
                ids, new = handles[t].add(batch)
                results[t].append((ids, new, batch))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    id_of: dict[str, int] = {}
    new_count: dict[str, int] = {}
    for per_thread in results:
        for ids, new, batch in per_thread:
            for i, is_new, it in zip(ids, new, batch, strict=True):
                assert id_of.setdefault(it.content_hash, i) == i
                new_count[it.content_hash] = new_count.get(it.content_hash, 0) + is_new
    assert len(id_of) == (rounds - 1) * 10 + 20
    assert set(new_count.values()) == {1}
    assert shared.count() == len(id_of) and sorted(shared.ids().tolist()) == sorted(id_of.values())


def test_quick_check(store: MetadataStore) -> None:
    assert store.quick_check() == "ok"


# --- the shared (PostgreSQL) backend alone -----------------------------------------------------------

pg = pytest.mark.cluster


@pytest.fixture
def open_pg(postgres_url: str) -> Iterator[Callable[..., object]]:
    from index.postgres_metadata import PostgresMetadata

    opened: list[PostgresMetadata] = []

    def open_(url: str = postgres_url, **options: object) -> PostgresMetadata:
        options.setdefault("create", True)
        store = PostgresMetadata(url, **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pg
def test_pending_items_are_invisible_to_readers(open_pg: Callable[..., object]) -> None:
    a, b = open_pg(), open_pg()  # two replicas
    (visible,), _ = a.add([item(1, {"Male": 1})])
    ids, new = a.add([item(2, {"Male": 1, "colour": "green"}), item(1)], pending=True)
    pending_id = ids[0]
    assert new == [True, False] and ids[1] == visible
    for reader in (a, b):
        assert reader.get(ids) == {visible: reader.get([visible])[visible]}
        assert reader.ids().tolist() == [visible] and reader.count() == 1
        assert reader.matching({"Male": 1}).tolist() == [visible]
        with pytest.raises(UnknownLabelError):
            reader.matching({"colour": "green"})  # only a pending item has it
        assert reader.label_names() == ["Male"]
        assert reader.states([pending_id, visible, 10**9]) == {pending_id: "pending", visible: "committed"}
    # A duplicate of the pending content from another replica is a duplicate (it must wait for commit).
    (dup,), (dup_new,) = b.add([item(2)])
    assert dup == pending_id and not dup_new
    assert b.ids_by_hash([item(2).content_hash]) == {item(2).content_hash: (pending_id, True)}
    assert [r.id for r in b.pending()] == [pending_id]
    assert a.commit([pending_id, visible]).tolist() == [pending_id]  # only pending ones are committed
    assert a.commit([pending_id]).tolist() == []
    assert b.get([pending_id])[pending_id].labels == {"Male": 1, "colour": "green"}
    assert b.matching({"colour": "green"}).tolist() == [pending_id]
    assert b.pending() == []


@pg
def test_repair_sees_old_pending_items_and_rolls_back_only_pending_ones(
    open_pg: Callable[..., object],
) -> None:
    store = open_pg()
    ids, _ = store.add([item(1), item(2), item(3)], pending=True)
    assert [r.id for r in store.pending(older_than_s=0)] == ids
    assert store.pending(older_than_s=3600) == []  # a replica's add in flight is not a crash's leftover
    record = store.pending()[0]
    assert (record.source, record.has_blob) == ("img/1.png", True)
    store.commit([ids[0]])  # a slow replica committed it meanwhile: the repair must keep it
    assert store.rollback(ids).tolist() == ids[1:]
    assert store.count() == 1 and store.states(ids) == {ids[0]: "committed"}
    assert store.commit(ids[1:]).tolist() == []  # the replica learns its add was rolled back
    # A delete removes the row whatever its state (then the caller removes the vectors).
    (late,), _ = store.add([item(4)], pending=True)
    assert store.remove([late, ids[0]]) == 2 and store.count() == 0 and store.pending() == []


@pg
def test_gallery_config(open_pg: Callable[..., object]) -> None:
    a, b = open_pg(), open_pg()
    assert a.config() is None
    config = {"tasks": ["Smiling", "Male"], "embedding_dim": 64, "model_hash": "ab" * 32, "backend": "milvus"}
    assert a.save_config(config) == config
    other = {**config, "model_hash": "cd" * 32}
    assert b.save_config(other) == config  # the first writer wins; the second replica gets its config
    assert b.config() == config
    grown = {**config, "tasks": [*config["tasks"], "Eyeglasses"]}
    assert b.save_config(grown, expected=config) == grown
    with pytest.raises(MetadataError, match="changed since it was read"):
        a.save_config({**config, "embedding_dim": 32}, expected=config)  # a stale read
    assert a.config() == grown


@pg
def test_two_galleries_share_one_database_under_two_schemas(
    open_pg: Callable[..., object], postgres_url: str
) -> None:
    a = open_pg(f"{postgres_url}?schema=gallery_a")
    b = open_pg(postgres_url, schema="gallery_b")
    (ia,), _ = a.add([item(1, {"Male": 1})])
    (ib,), (new,) = b.add([item(1, {"Male": 0})])
    assert new and ia == ib == 1  # separate sequences, separate contents
    assert a.matching({"Male": 1}).tolist() == [1] and b.matching({"Male": 1}).tolist() == []
    a.save_config({"tasks": ["x"]})
    assert b.config() is None
    assert open_pg(postgres_url).count() == 0  # the default schema is a third gallery


@pg
def test_image_bytes_as_files_in_a_shared_directory(open_pg: Callable[..., object], tmp_path: Path) -> None:
    store = open_pg(blob_dir=tmp_path / "shared")
    (i,), _ = store.add([item(1)])
    path = tmp_path / "shared" / item(1).content_hash[:2] / item(1).content_hash
    assert path.read_bytes() == item(1).data == store.read_blob(item(1).content_hash)
    assert store.get([i])[i].has_blob
    assert open_pg().read_blob(item(1).content_hash) is None  # not in the database


_ADDER = """
import json, sys
from index.postgres_metadata import PostgresMetadata
from tests.index.test_metadata_contract import item
store = PostgresMetadata(sys.argv[1], create=True)
seed = int(sys.argv[2])
out = []
for r in range(8):
    order = sorted(range(r * 5, r * 5 + 15), key=lambda n: (n * (seed + 7)) % 13)
    ids, new = store.add([item(n) for n in order], pending=bool(seed % 2))
    if seed % 2:
        store.commit([i for i, is_new in zip(ids, new) if is_new])
    out.append([[n, i, is_new] for n, i, is_new in zip(order, ids, new)])
store.close()
print(json.dumps(out))
"""


@pg
def test_processes_adding_the_same_content_at_once_get_one_id(postgres_url: str) -> None:
    """Four processes (replicas) add overlapping batches at once, two of them as pending-then-commit."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ADDER, postgres_url, str(seed)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    id_of: dict[int, int] = {}
    new_count: dict[int, int] = {}
    for output in outputs:
        for batch in json.loads(output):
            for n, i, is_new in batch:
                assert id_of.setdefault(n, i) == i
                new_count[n] = new_count.get(n, 0) + is_new
    assert len(id_of) == 7 * 5 + 15 and set(new_count.values()) == {1}
    from index.postgres_metadata import PostgresMetadata

    store = PostgresMetadata(postgres_url)
    try:
        assert sorted(store.ids().tolist()) == sorted(id_of.values()) and store.pending() == []
    finally:
        store.close()


@pg
def test_refusals_are_metadata_errors(postgres_url: str, postgres_server: PostgresServer) -> None:
    from index.postgres_metadata import PostgresMetadata, redact_url

    with pytest.raises(MetadataError, match="holds no gallery metadata"):
        PostgresMetadata(postgres_url)  # not created: refused, not silently made empty
    closed_port = f"postgresql://modret:secret@127.0.0.1:{_closed_port()}/postgres"
    with pytest.raises(MetadataError, match=r"modret:\*\*\*@127\.0\.0\.1") as refused:
        PostgresMetadata(closed_port, create=True, connect_timeout_s=2)
    assert "secret" not in str(refused.value) and refused.value.__cause__ is None
    with pytest.raises(MetadataError, match="does not exist"):
        PostgresMetadata(postgres_server.url("no_such_database"), create=True)
    with pytest.raises(MetadataError, match="not an identifier"):
        PostgresMetadata(postgres_url, schema="a; DROP TABLE x", create=True)
    with pytest.raises(MetadataError, match="not supported"):
        open_metadata("mysql://host/db", Path("unused"))
    assert redact_url("postgresql://u:p@h:1/d?schema=s") == "postgresql://u:***@h:1/d?schema=s"
    store = PostgresMetadata(postgres_url, create=True)
    store.close()
    with pytest.raises(MetadataError, match="closed"):
        store.count()
    reader = PostgresMetadata(postgres_url, read_only=True)
    try:
        assert reader.count() == 0
        with pytest.raises(MetadataError, match="read-only"):
            reader.add([item(1)])
    finally:
        reader.close()


@pg
def test_a_database_outage_is_a_metadata_error_and_service_resumes_after_it() -> None:
    """A server of its own (stopped and started again): calls during the outage fail with a
    ``MetadataError`` within the timeout; once it is back, the next call works (no stale connection)."""
    from index.postgres_metadata import PostgresMetadata

    server = PostgresServer.start()
    try:
        store = PostgresMetadata(server.create_database(), create=True, connect_timeout_s=2)
        try:
            (i,), _ = store.add([item(1)])
            server.pause()
            started = time.monotonic()
            with pytest.raises(MetadataError, match=r"no connection within 2 s: .*refused") as down:
                store.get([i])
            assert down.value.__cause__ is None and time.monotonic() - started < 10
            server.resume()
            assert store.get([i])[i].content_hash == item(1).content_hash
            (j,), (new,) = store.add([item(2)])
            assert new and j > i
        finally:
            store.close()
    finally:
        server.stop()


def _closed_port() -> int:
    from tests.processes import free_port

    return free_port()  # nothing listens there once the probe socket is closed


def test_sqlite_is_the_default_for_no_url(tmp_path: Path) -> None:
    store = open_metadata(None, tmp_path, create=True)
    try:
        assert isinstance(store, Metadata) and store.count() == 0
    finally:
        store.close()
