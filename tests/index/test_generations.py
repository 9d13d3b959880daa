"""Durability: generations commit atomically, corrupt ones are refused with a clear message and the
previous good one is served, old ones are pruned, and SIGKILL at random moments of a save loses nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from index import faiss_store
from index.faiss_store import FaissStore
from index.generations import Generations, NoGoodGenerationError
from tests.index.conftest import DIM, MODEL_HASH, TASKS, vectors_by_task

KILLS = 60


def open_faiss(root: Path, model_hash: str = MODEL_HASH) -> FaissStore:
    store = FaissStore(root, tasks=TASKS, dim=DIM, model_hash=model_hash, search_device="faiss")
    store.load()
    return store


def save_generations(root: Path, count: int) -> list[int]:
    """``count`` generations; generation g holds ids 0 .. 10*g-1. Returns the committed numbers."""
    store = open_faiss(root)
    rng = np.random.default_rng(0)
    for g in range(count):
        store.add(np.arange(10 * g, 10 * g + 10, dtype=np.int64), vectors_by_task(rng, 10))
        store.save()
    return store.generations.committed()


def newest(root: Path, suffix: str) -> Path:
    return sorted(root.glob(f"gen-*/*{suffix}"))[-1] if suffix else sorted(root.glob("manifest-*.json"))[-1]


def test_generations_are_pruned_to_two(tmp_path: Path) -> None:
    assert save_generations(tmp_path, 5) == [5, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "gen-00000004",
        "gen-00000005",
        "manifest-00000004.json",
        "manifest-00000005.json",
    ]
    store = open_faiss(tmp_path)
    assert store.manifest is not None and store.manifest.generation == 5
    assert store.count("Smiling") == 50


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("target", "damage", "reason"),
    [
        ("manifest", truncate, "corrupt manifest"),
        ("manifest", lambda p: flip_bit(p, 200), "corrupt manifest"),
        (".faiss", truncate, "truncated"),
        (".faiss", lambda p: flip_bit(p, p.stat().st_size // 2), "checksum mismatch"),
        (".faiss", os.unlink, "missing"),
    ],
    ids=["manifest-truncated", "manifest-bitflip", "index-truncated", "index-bitflip", "index-missing"],
)
def test_corruption_falls_back_to_previous_generation(
    tmp_path: Path, target: str, damage, reason: str
) -> None:
    save_generations(tmp_path, 3)
    damage(newest(tmp_path, "" if target == "manifest" else target))
    store = open_faiss(tmp_path)
    assert store.manifest is not None and store.manifest.generation == 2
    assert store.count("Smiling") == 20
    assert len(store.generations.rejected) == 1
    assert "manifest-00000003.json" in store.generations.rejected[0]
    assert reason in store.generations.rejected[0]
    # The next save keeps the good generation 2 beside the new one, not the corrupt 3.
    store.save()
    assert store.generations.committed() == [4, 2]


def test_model_hash_mismatch_is_refused(tmp_path: Path) -> None:
    save_generations(tmp_path, 2)
    with pytest.raises(NoGoodGenerationError, match=r"built with model 000000000000….*rebuild the index"):
        open_faiss(tmp_path, model_hash="f" * 64)


def test_temporaries_and_uncommitted_directories_are_never_loaded(tmp_path: Path) -> None:
    save_generations(tmp_path, 1)
    # A crashed save: a temporary directory and a renamed generation directory without manifest.
    (tmp_path / ".tmp-gen-00000002-x").mkdir()
    (tmp_path / ".tmp-gen-00000002-x" / "task-000.faiss").write_bytes(b"garbage")
    (tmp_path / "gen-00000003").mkdir()
    store = open_faiss(tmp_path)
    assert store.manifest is not None and store.manifest.generation == 1
    store.save()
    assert store.generations.committed() == [4, 1]
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "gen-00000003").exists()


def test_manifest_records_counts_checksums_and_model(tmp_path: Path) -> None:
    save_generations(tmp_path, 1)
    manifest = json.loads(newest(tmp_path, "").read_text())
    assert manifest["model_hash"] == MODEL_HASH and manifest["embedding_dim"] == DIM
    assert manifest["metric"] == "ip" and manifest["counts"] == {"Smiling": 10, "Eyeglasses": 10}
    assert set(manifest["files"]) == {"task-000.faiss", "task-001.faiss"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert Generations(tmp_path).verify(1, model_hash=MODEL_HASH, embedding_dim=DIM).generation == 1


# --- crash test ----------------------------------------------------------------------------------------


def _save_forever(root: str, first_id: int, conn: Connection) -> None:
    """Child: add 3 fresh ids and save, forever; report the highest id after each save returns."""
    store = open_faiss(Path(root))
    rng = np.random.default_rng(first_id)
    next_id = first_id
    conn.send(("ready", next_id - 1))
    while True:
        ids = np.arange(next_id, next_id + 3, dtype=np.int64)
        store.add(ids, vectors_by_task(rng, 3))
        if next_id % 2:
            store.remove(ids[:1])  # removals are saved too
        store.save()
        next_id += 3
        conn.send(("saved", next_id - 1))


def expected_ids(last: int) -> np.ndarray:
    """Ids 0..last written by the children: every third id of an odd-numbered batch was removed."""
    batch_starts = np.arange(0, last + 1, 3)
    removed = batch_starts[batch_starts % 2 == 1]
    return np.setdiff1d(np.arange(last + 1), removed)


def test_sigkill_during_save_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fork: the child starts in milliseconds with faiss already imported; it never runs OpenMP code.
    context = multiprocessing.get_context("fork")
    loaded_paths: list[str] = []
    real_read_index = faiss_store.faiss.read_index
    monkeypatch.setattr(
        faiss_store.faiss, "read_index", lambda path: loaded_paths.append(path) or real_read_index(path)
    )
    chooser = random.Random(1234)
    committed_last = -1  # highest id whose save returned, over all children
    for _ in range(KILLS):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_save_forever, args=(str(tmp_path), committed_last + 1, send))
        child.start()
        send.close()
        assert receive.poll(10), "child did not start"
        assert receive.recv()[0] == "ready"
        time.sleep(chooser.uniform(0, 0.15))
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        while receive.poll():
            try:
                _, committed_last = receive.recv()
            except EOFError:
                break
        receive.close()

        store = open_faiss(tmp_path)
        assert store.generations.rejected == []
        manifest = store.manifest
        if manifest is None:  # killed before its first save ever committed
            assert committed_last == -1
            continue
        assert not store.generations.directory(manifest).name.startswith(".tmp")
        store.generations.verify(manifest.generation, model_hash=MODEL_HASH, embedding_dim=DIM)
        ids = store.ids("Smiling")
        np.testing.assert_array_equal(store.ids("Eyeglasses"), ids)
        # Every id whose save returned is there; a save that completed just before the kill (but was
        # not reported yet) may add one more batch, nothing else.
        last = int(ids.max())
        assert last >= committed_last
        np.testing.assert_array_equal(ids, expected_ids(last))
        committed_last = last
        store.close()
    assert committed_last > 3 * 30, "too few saves completed for the test to mean anything"
    assert loaded_paths and not any(".tmp" in path for path in loaded_paths)
