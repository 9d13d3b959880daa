"""The write-ahead log and the gallery writing through it: records round-trip, a torn or bit-flipped tail is
dropped with a warning naming it (damage before the end is refused), recovery replays the records after
the newest snapshot (removes in order with adds), concurrent writers share fsyncs, snapshots run in the
background and truncate the log, a fall-back to an older generation loses nothing, damaged metadata or
config refuse to open without deleting anything and are rebuilt by ``index.recovery.recover``, and a full
disk refuses a write without stopping the gallery: once there is room the next write succeeds."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from index.gallery import LOG_DIR, STORE_DIR, DamagedGalleryError, Gallery, GalleryError
from index.gallery_files import StorageFull
from index.metadata import content_hash
from index.recovery import recover
from index.wal import ADD, REMOVE, ItemRecord, LogCorruptError, WriteAheadLog, encode_add, encode_remove
from tests.index.conftest import DIM, MODEL_HASH, TASKS
from tests.index.test_gallery import create, item, vectors
from tests.volumes import small_volume


def logged(n: int) -> ItemRecord:
    return ItemRecord(n, f"img{n}.jpg", f"{n:064x}", 30 + n, 20, {"Male": n % 2}, n % 3 == 0, "2024-01-01")


def write_log(directory: Path, records: int) -> WriteAheadLog:
    """A log of ``records`` add records (one item each, vectors = position)."""
    wal = WriteAheadLog(directory)
    wal.open_for_append(wal.scan())
    for n in range(1, records + 1):
        vectors = np.full((1, len(TASKS), DIM), n, dtype=np.float32)
        wal.append([(ADD, encode_add([logged(n)], vectors, []))])
    return wal


def test_records_round_trip(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.open_for_append(wal.scan())
    rng = np.random.default_rng(0)
    added = rng.standard_normal((2, len(TASKS), DIM)).astype(np.float32)
    last = wal.append(
        [(ADD, encode_add([logged(1), logged(2)], added, [7])), (REMOVE, encode_remove([1, 9]))]
    )
    assert last == 2 and wal.syncs == 1  # two records, one fsync
    wal.close()
    scan = WriteAheadLog(tmp_path).scan()
    assert (scan.first, scan.last, scan.tail) == (1, 2, None)
    add, remove = scan.records
    assert add.kind == ADD and add.items == [logged(1), logged(2)] and add.ids == [7]
    assert add.vectors is not None and add.vectors.dtype == np.float32
    np.testing.assert_array_equal(add.vectors, added)
    assert remove.kind == REMOVE and remove.ids == [1, 9] and remove.position == 2


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_torn_tail_is_dropped_and_named(tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture) -> None:
    write_log(tmp_path, 3).close()
    [segment] = WriteAheadLog(tmp_path).segments()
    size = segment.stat().st_size
    os.truncate(segment, size - cut)  # a crash inside the last append
    wal = WriteAheadLog(tmp_path)
    scan = wal.scan()
    assert scan.last == 2 and [r.position for r in scan.records] == [1, 2]
    assert scan.tail is not None and scan.tail.position == 3 and scan.tail.segment == segment
    with caplog.at_level(logging.WARNING):
        wal.open_for_append(scan)
    assert f"{segment.name}: dropped an incomplete record at byte" in caplog.text
    assert "position 3" in caplog.text
    assert wal.append([(REMOVE, encode_remove([1]))]) == 3  # the next record takes the dropped position
    wal.close()
    again = WriteAheadLog(tmp_path).scan()
    assert again.tail is None and [r.kind for r in again.records] == [ADD, ADD, REMOVE]


def test_bit_flips_are_detected(tmp_path: Path) -> None:
    write_log(tmp_path, 3).close()
    [segment] = WriteAheadLog(tmp_path).segments()
    clean = segment.read_bytes()
    record_size = len(clean) // 3
    # In the last record: a tail that does not verify, dropped like a torn one.
    damaged = bytearray(clean)
    damaged[-5] ^= 0x01
    segment.write_bytes(bytes(damaged))
    scan = WriteAheadLog(tmp_path).scan()
    assert scan.last == 2 and scan.tail is not None and scan.tail.reason == "checksum mismatch"
    # In the middle: acknowledged records follow it, so nothing may be dropped: refused.
    damaged = bytearray(clean)
    damaged[record_size + 30] ^= 0x01
    segment.write_bytes(bytes(damaged))
    with pytest.raises(
        LogCorruptError, match=r"record 2 at byte \d+ is damaged .* acknowledged records follow"
    ):
        WriteAheadLog(tmp_path).scan()


def test_a_missing_segment_is_refused(tmp_path: Path) -> None:
    wal = write_log(tmp_path, 2)
    wal.rotate()
    wal.append([(REMOVE, encode_remove([1]))])
    wal.rotate()
    wal.append([(REMOVE, encode_remove([2]))])
    wal.close()
    segments = WriteAheadLog(tmp_path).segments()
    assert len(segments) == 3
    segments[1].unlink()
    with pytest.raises(LogCorruptError, match=r"expected 3 .*a segment is missing"):
        WriteAheadLog(tmp_path).scan()


def test_replay_after_snapshot_keeps_removes_in_order_with_adds(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    first = gallery.add([item(i, 0) for i in range(4)], vectors(4))
    gallery.save()  # generation 1 covers records 1
    assert gallery.remove([first[0]]) == 1
    [again] = gallery.add([item(0, 1)], vectors(1, seed=5))  # the removed content comes back: a new id
    assert again not in first
    assert gallery.remove([again, first[1], 999]) == 2  # removes what is there, in order after the add
    [last] = gallery.add([item(50, 1)], vectors(1, seed=6))
    expected = sorted([first[2], first[3], last])
    gallery.close(snapshot=False)

    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert reopened.store.manifest is not None and reopened.store.manifest.log_position == 1
    assert reopened.metadata.ids().tolist() == expected
    for task in TASKS:
        assert reopened.store.ids(task).tolist() == expected
    assert reopened.items([last])[last].labels == {"Male": 1, "Smiling": 0}
    np.testing.assert_allclose(reopened.vectors([last], "Smiling"), vectors(1, seed=6)[:, 0], atol=1e-6)
    [fresh] = reopened.add([item(60, 0)], vectors(1, seed=7))
    assert fresh > last  # ids are never handed out again, even those only the log knew
    reopened.close()


def test_group_commit_shares_fsyncs_and_every_acknowledged_add_is_durable(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    assert gallery.committer is not None
    writers = 16
    start = threading.Barrier(writers)
    acknowledged: dict[int, int] = {}

    def add(n: int) -> None:
        start.wait()
        [acknowledged[n]] = gallery.add([item(n, n % 2)], vectors(1, seed=n))

    threads = [threading.Thread(target=add, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    syncs = gallery.committer.wal.syncs
    gallery.close(snapshot=False)
    assert len(acknowledged) == writers
    assert syncs < writers, f"{syncs} fsyncs for {writers} concurrent adds: no group commit"
    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert sorted(reopened.metadata.ids().tolist()) == sorted(acknowledged.values())
    for n, item_id in acknowledged.items():
        np.testing.assert_allclose(
            reopened.vectors([item_id], "Eyeglasses"), vectors(1, seed=n)[:, 1], atol=1e-6
        )
    reopened.close()


def test_a_concurrent_duplicate_is_answered_once_durable(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    start = threading.Barrier(2)
    answers: list[tuple[list[int], list[bool]]] = []

    def add() -> None:
        start.wait()
        result = gallery.insert([item(1, 0, upload=True)], vectors(1))
        answers.append((result.ids, result.new))

    threads = [threading.Thread(target=add) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(new for _, [new] in answers) == [False, True]
    assert answers[0][0] == answers[1][0]
    gallery.close(snapshot=False)
    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert reopened.metadata.ids().tolist() == answers[0][0]
    reopened.close()


def test_background_snapshots_truncate_the_log(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    gallery.close()
    gallery = Gallery.open(tmp_path, model_hash=MODEL_HASH, snapshot_every_records=4, snapshot_every_s=3600)
    for n in range(13):
        gallery.add([item(n, 0)], vectors(1, seed=n))
    # A snapshot follows once 4 records are past the last one; when a batch lands while the previous
    # snapshot is still being written it is taken a record or more later, so after 13 records the newest
    # snapshot covers at least 13 - 4 = 9 of them (not necessarily 12).
    deadline = time.monotonic() + 20
    while (
        gallery.store.manifest is None or gallery.store.manifest.log_position < 9
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    manifest = gallery.store.manifest
    assert manifest is not None and manifest.log_position >= 9
    assert {"metadata.sqlite", "gallery.json"} <= set(manifest.files)
    # The log keeps what the oldest kept generation does not cover, and no more.
    kept = gallery.store.generations.manifests()
    assert len(kept) == 2
    retained = gallery.store.generations.retained_position()
    assert retained == min(m.log_position for m in kept.values() if not isinstance(m, str)) >= 4
    first = int(WriteAheadLog(tmp_path / LOG_DIR).segments()[0].stem)
    assert first == retained + 1
    gallery.close()
    reopened = Gallery.open(tmp_path, read_only=True)
    assert reopened.metadata.count() == 13 and reopened.verify(MODEL_HASH).ok
    reopened.close()


def test_fall_back_to_the_previous_generation_loses_nothing(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    gallery.add([item(i, 0) for i in range(3)], vectors(3))
    gallery.save()
    gallery.add([item(i, 0) for i in range(3, 6)], vectors(3, seed=1))
    gallery.remove([2])
    gallery.save()
    gallery.add([item(9, 1)], vectors(1, seed=2))
    gallery.close(snapshot=False)
    newest = sorted((tmp_path / STORE_DIR).glob("gen-*"))[-1] / "task-000.faiss"
    pristine = newest.read_bytes()
    newest.write_bytes(pristine[:-4])

    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert reopened.store.manifest is not None and reopened.store.manifest.generation == 1
    assert reopened.metadata.ids().tolist() == [1, 3, 4, 5, 6, 7]
    assert reopened.store.ids("Smiling").tolist() == [1, 3, 4, 5, 6, 7]
    reopened.close(snapshot=False)
    newest.write_bytes(pristine)  # the damaged generation restored: still consistent
    restored = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert restored.store.manifest is not None and restored.store.manifest.generation == 2
    assert restored.store.ids("Smiling").tolist() == [1, 3, 4, 5, 6, 7]
    assert restored.verify(MODEL_HASH).ok
    restored.close()


def test_verify_beside_a_writer_sees_one_moment(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    gallery.add([item(i, 0) for i in range(4)], vectors(4))
    gallery.save()
    gallery.add([item(5, 0)], vectors(1, seed=1))
    gallery.remove([2])  # in the log, not in any generation
    reader = Gallery.open(tmp_path, read_only=True)
    report = reader.verify(MODEL_HASH)
    assert report.ok, report.problems
    assert reader.store.ids("Smiling").tolist() == [1, 3, 4, 5]
    reader.close()
    gallery.close()


def damage_sqlite_truncate(root: Path) -> None:
    os.truncate(root / "gallery.sqlite", 0)


def damage_sqlite_header(root: Path) -> None:
    path = root / "gallery.sqlite"
    data = bytearray(path.read_bytes())
    data[:16] = b"garbage garbage!"
    path.write_bytes(bytes(data))


def damage_sqlite_missing(root: Path) -> None:
    for path in root.glob("gallery.sqlite*"):
        path.unlink()


def damage_config(root: Path) -> None:
    (root / "gallery.json").write_bytes(b"\x00\xffnot json")


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (damage_sqlite_truncate, "gallery.sqlite holds no gallery metadata"),
        (damage_sqlite_header, "gallery.sqlite is not a readable gallery database"),
        (damage_sqlite_missing, "gallery.sqlite is missing"),
        (damage_config, "gallery.json is damaged"),
    ],
    ids=["sqlite-emptied", "sqlite-garbled-header", "sqlite-missing", "config-garbage"],
)
def test_damaged_metadata_or_config_refuses_then_recovers(tmp_path: Path, damage, names: str) -> None:
    gallery = create(tmp_path)
    ids = gallery.add([item(i, i % 2, upload=i < 2) for i in range(6)], vectors(6))
    gallery.save()
    gallery.remove([ids[0]])
    gallery.add([item(20, 1)], vectors(1, seed=3))  # after the snapshot: only the log has these two
    gallery.close(snapshot=False)
    store_files = {p: p.read_bytes() for p in (tmp_path / STORE_DIR).rglob("*.faiss")}
    damage(tmp_path)

    for read_only in (False, True):
        with pytest.raises(DamagedGalleryError, match=names) as refused:
            Gallery.open(tmp_path, read_only=read_only)
        message = str(refused.value)
        assert "\n" not in message and f"modret index recover {tmp_path}" in message
    with pytest.raises(GalleryError, match=names):
        Gallery.preflight(tmp_path)
    assert {p: p.read_bytes() for p in (tmp_path / STORE_DIR).rglob("*.faiss")} == store_files  # untouched

    done = recover(tmp_path)
    assert any("rebuilt from" in line for line in done), done
    assert list(tmp_path.glob("*.damaged-*")) or names == "gallery.sqlite is missing"
    recovered = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert recovered.metadata.ids().tolist() == [*ids[1:], 7]
    assert recovered.items([7])[7].labels == {"Male": 1, "Smiling": 0}
    assert recovered.verify(MODEL_HASH).ok
    recovered.close()


def test_damage_before_the_end_of_the_log_refuses(tmp_path: Path) -> None:
    gallery = create(tmp_path)
    for n in range(3):
        gallery.add([item(n, 0)], vectors(1, seed=n))
    gallery.close(snapshot=False)
    [segment] = WriteAheadLog(tmp_path / LOG_DIR).segments()
    data = bytearray(segment.read_bytes())
    data[40] ^= 0x04
    segment.write_bytes(bytes(data))
    with pytest.raises(
        DamagedGalleryError, match=r"record 1 at byte 0 is damaged.*restore the gallery from a backup"
    ):
        Gallery.open(tmp_path)


def test_legacy_gallery_without_a_log_is_converted(tmp_path: Path) -> None:
    """A gallery written before the log (no log_state table): opened, snapshotted on close, then logged."""
    gallery = create(tmp_path)
    gallery.add([item(i, 0) for i in range(3)], vectors(3))
    gallery.save()
    gallery.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "gallery.sqlite") as db:
        db.execute("DROP TABLE log_state")
    for segment in WriteAheadLog(tmp_path / LOG_DIR).segments():
        segment.unlink()
    legacy = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert legacy.metadata.ids().tolist() == [1, 2, 3]
    legacy.add([item(7, 0)], vectors(1, seed=1))
    legacy.close(snapshot=False)
    reopened = Gallery.open(tmp_path, model_hash=MODEL_HASH)
    assert reopened.metadata.ids().tolist() == [1, 2, 3, 4] and reopened.verify(MODEL_HASH).ok
    reopened.close()


def test_an_append_without_room_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    with small_volume(tmp_path / "vol", "1m") as volume:
        wal = write_log(volume.root / "log", 2)
        [segment] = wal.segments()
        size = segment.stat().st_size
        volume.fill(leave=4096)
        big = np.zeros((64, len(TASKS), 1024), dtype=np.float32)  # 512 KiB: more than is left
        with pytest.raises(OSError) as raised:
            wal.append(
                [(ADD, encode_add([logged(3)], big[:1].repeat(64, 0), [])), (REMOVE, encode_remove([1]))]
            )
        assert raised.value.errno == errno.ENOSPC
        assert segment.stat().st_size == size and wal.next_position == 3  # cut back: as if never tried
        volume.free()
        assert wal.append([(REMOVE, encode_remove([2]))]) == 3
        wal.close()
        scan = WriteAheadLog(volume.root / "log").scan()
        assert [r.position for r in scan.records] == [1, 2, 3] and scan.tail is None


def test_a_full_disk_refuses_writes_and_the_next_one_succeeds_once_there_is_room(tmp_path: Path) -> None:
    """The three places a logged add meets a full disk: its image bytes, the log's append, the metadata
    (SQLite's SQLITE_FULL, with ``max_page_count`` as the quota). Each refusal changes nothing."""
    with small_volume(tmp_path / "vol", "4m") as volume:
        root = volume.root / "gallery"
        gallery = create(root)
        assert gallery.add([item(0, 0, upload=True)], vectors(1)) == [1]
        volume.fill(leave=8192)
        big = b"\xff" * 65536
        large = replace(item(1, 1), data=big, content_hash=content_hash(big))
        with pytest.raises(StorageFull, match="no room to write"):  # the image bytes, before the log
            gallery.add([large], vectors(1, seed=1))
        with pytest.raises(StorageFull):  # the log (64 items' vectors do not fit either)
            gallery.add([item(n, 0) for n in range(2, 66)], vectors(64, seed=2))
        volume.free()
        db = gallery.metadata._db
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        assert gallery.committer is not None
        with pytest.raises(StorageFull):  # logged, then cut from the log when its metadata could not be
            gallery.add([item(n, 0) for n in range(100, 400)], vectors(300, seed=3))
        assert gallery.metadata.count() == 1 and gallery.store.count("Smiling") == 1
        db.execute("PRAGMA max_page_count = 1073741823")
        assert gallery.add([item(1, 1, upload=True)], vectors(1, seed=1)) == [2]  # room again
        assert gallery.remove([1]) == 1
        gallery.close(snapshot=False)
        reopened = Gallery.open(root, model_hash=MODEL_HASH)
        assert reopened.metadata.ids().tolist() == [2]
        assert reopened.items([2])[2].has_blob
        scan = reopened.scan
        assert scan is not None and scan.tail is None
        assert reopened.verify(MODEL_HASH).ok
        reopened.close()
