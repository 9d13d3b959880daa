"""Label filters inside Milvus (``index.milvus_labels``) on the real Milvus 2.3.5 server: a filtered search
is the brute-force oracle over the items whose labels match (integers, category names, names and values
that need escaping, non-ASCII), expressions that Milvus cannot parse are refused on add, labels read back
as written, and collections without the labels field are refused. The expressions need no server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.milvus_labels import LabelledMilvusStore, label_expression, normalised
from index.store import open_store
from tests.index.conftest import DIM, MODEL_HASH, TASKS, Oracle, assert_matches_oracle, vectors_by_task
from tests.milvus_server import MilvusServer

VALUES: list[dict[str, int | str]] = [
    {"Male": 1, "colour": "green"},
    {"Male": 0, "colour": "green"},
    {"Male": 1, "colour": "red", "size": "Größe ü"},
    {"Male": "1", "colour": 'quote " and \\ back', "we.ird-name": "a'b"},
    {"colour": "1x"},
    {},
]
FILTERS: list[dict[str, int | str]] = [
    {"Male": 1},
    {"Male": 0},
    {"colour": "green"},
    {"Male": 1, "colour": "green"},
    {"size": "Größe ü"},
    {"colour": 'quote " and \\ back'},
    {"we.ird-name": "a'b"},
    {"colour": "1x"},
    {"Male": "1", "colour": "red"},  # "1" is 1
    {"Male": 2},  # no item
    {"nobody": 1},  # no item has the name: no match (the gallery refuses it before it gets here)
]


def test_expressions_escape_names_and_values_and_normalise() -> None:
    assert label_expression({}) == ""
    assert (
        label_expression({"Male": "1", "colour": " green "})
        == 'labels["Male"] == 1 and labels["colour"] == "green"'
    )
    assert label_expression({"a": 'x"y'}) == 'labels["a"] == "x\\"y"'
    assert label_expression({"g": "ü"}) == 'labels["g"] == "ü"'
    with pytest.raises(ValueError, match="empty"):
        normalised({"": 1})
    with pytest.raises(ValueError, match="64 bits"):
        normalised({"n": 2**64})


@pytest.fixture
def labelled(
    milvus_server: MilvusServer, milvus_prefix: str, tmp_path: Path
) -> Iterator[LabelledMilvusStore]:
    store = LabelledMilvusStore(
        tmp_path / "store", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, uri=milvus_server.uri,
        collection_prefix=milvus_prefix,
    )  # fmt: skip
    yield store
    store.close()


@pytest.mark.cluster
def test_filtered_search_matches_the_brute_force_oracle(labelled: LabelledMilvusStore) -> None:
    rng = np.random.default_rng(7)
    n = 60
    ids = np.arange(10, 10 + n, dtype=np.int64)
    by_task = vectors_by_task(rng, n)
    labels = [VALUES[i % len(VALUES)] for i in range(n)]
    labelled.add(ids, by_task, labels=labels)
    oracle = Oracle()
    oracle.add(ids, by_task)
    assert labelled.labels(TASKS[0], ids[:6]) == {
        int(i): normalised(v) for i, v in zip(ids, VALUES, strict=False)
    }
    queries = vectors_by_task(rng, 3)
    for conditions in FILTERS:
        wanted = normalised(conditions)
        allowed = np.array(
            [
                i
                for i, lab in zip(ids, labels, strict=True)
                if all(normalised(lab).get(k) == v for k, v in wanted.items())
            ],
            dtype=np.int64,
        )
        for task in TASKS:
            for k in (1, 5, n + 5):
                found = labelled.search(task, queries[task], k, where=label_expression(conditions))
                assert_matches_oracle(found.ids, found.scores, oracle, task, queries[task], k, allowed)
    # with an id filter too: both apply
    found = labelled.search(
        TASKS[0], queries[TASKS[0]], 5, filter=ids[:12], where=label_expression({"Male": 1})
    )
    both = np.intersect1d(
        ids[:12], [i for i, lab in zip(ids, labels, strict=True) if normalised(lab).get("Male") == 1]
    )
    assert_matches_oracle(found.ids, found.scores, oracle, TASKS[0], queries[TASKS[0]], 5, both)
    with pytest.raises(ValueError, match="empty"):
        labelled.add(np.array([1]), vectors_by_task(rng, 1), labels=[{"": 1}])
    assert labelled.count(TASKS[0]) == n


@pytest.mark.cluster
def test_an_empty_collection_searches_and_collections_without_labels_are_refused(
    milvus_server: MilvusServer, milvus_prefix: str, tmp_path: Path
) -> None:
    store = LabelledMilvusStore(
        tmp_path / "a", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, uri=milvus_server.uri,
        collection_prefix=milvus_prefix,
    )  # fmt: skip
    try:
        found = store.search(
            TASKS[0], vectors_by_task(np.random.default_rng(1), 2)[TASKS[0]], 3, where='labels["a"] == 1'
        )
        assert (found.ids == -1).all()
    finally:
        store.close()
    plain_prefix = f"{milvus_prefix}_plain"
    plain = open_store(
        "milvus", tmp_path / "b", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH,
        options={"uri": milvus_server.uri, "collection_prefix": plain_prefix},
    )  # fmt: skip
    plain.close()
    with pytest.raises(ValueError, match="has no 'labels' field"):
        LabelledMilvusStore(
            tmp_path / "c", tasks=TASKS, dim=DIM, model_hash=MODEL_HASH, uri=milvus_server.uri,
            collection_prefix=plain_prefix,
        )  # fmt: skip
