"""Milvus collections that carry each item's labels, so that a label filter runs inside Milvus (#14).

A shared gallery (``index.shared_gallery``) keeps its vectors on a Milvus server that every replica
reaches. Resolving a filter such as ``{"Male": 1}`` to the allowed ids in PostgreSQL and shipping them to
Milvus as ``id in [...]`` costs a round trip of every matching id per search: with millions of items, an
expression of megabytes. So each collection of a shared gallery has, besides ``id`` and ``vector``, a
``labels`` field of Milvus' ``JSON`` type holding the item's labels as PostgreSQL holds them (an object
``{"Male": 1, "colour": "green"}``: integers as JSON numbers, names of categories as JSON strings, every
value normalised by ``model.data.base.as_label_value``), written by the add with the vectors and never
changed after it (an item's labels do not change), and a filter becomes the expression
``labels["Male"] == 1 and labels["colour"] == "green"`` (``label_expression``), evaluated by Milvus while
it searches. An item without the label does not match, as in PostgreSQL (``labels @> '{...}'``).

Checked against the real Milvus 2.3.5 server (``tests/index/test_milvus_labels.py``): JSON fields and
``labels["name"] == value`` filters with string literals in JSON's escaping, non-ASCII written as is
(Milvus' parser does not read ``\\u`` escapes of non-ASCII characters: ``ensure_ascii=False``). What Milvus
cannot express is refused on add (``ValueError``) rather than stored unfilterable: an empty label name
(``labels[""]`` is not an identifier there) and an integer outside 64 bits (the API accepts neither).
One field per label name was the alternative, but a collection's schema cannot gain fields in 2.3 and the
names are only known as items arrive. Milvus 2.3 has no index on JSON fields: a filtered search scans the
labels of the segments it searches (in the query nodes, beside the vectors), which is what a brute-force
``FLAT`` search does with the vectors anyway; the id list it replaces grew with the gallery on the wire.

``LabelledMilvusStore`` is a ``MilvusStore`` whose collections have that field: ``add`` takes the items'
labels, ``search`` an expression (``where``) besides the id filter, and ``labels`` reads them back (for
``verify``: PostgreSQL and Milvus must agree). Searches and gets stay ``Strong`` (a replica sees what another
acknowledged); ``count`` is ``Bounded`` (a listing's figure, a moment old at most). Opening collections
created without the field (a single-machine Milvus gallery's) is refused: their items carry no labels to
filter on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from index.milvus_store import _CHUNK, MAX_LIMIT, MilvusStore
from index.store import (
    as_ids,
    check_task,
)
from model.data.base import LabelValue, as_label_value

LABELS_FIELD = "labels"
_INT64 = (-(2**63), 2**63)


def normalised(labels: Mapping[str, Any]) -> dict[str, LabelValue]:
    """``labels`` as every backend stores them (``as_label_value``); ``ValueError`` for what a Milvus
    expression cannot name (an empty name, an integer outside 64 bits)."""
    out: dict[str, LabelValue] = {}
    for name, value in labels.items():
        key = str(name)
        if not key:
            raise ValueError("a label name must not be empty")
        label = as_label_value(value)
        if isinstance(label, int) and not _INT64[0] <= label < _INT64[1]:
            raise ValueError(f"label {key!r}: an integer label value must fit in 64 bits")
        out[key] = label
    return out


def _literal(value: str | int) -> str:
    # JSON's escaping is what Milvus' expression parser reads for string literals; non-ASCII as is.
    return json.dumps(value, ensure_ascii=False)


def label_expression(conditions: Mapping[str, LabelValue]) -> str:
    """The Milvus filter expression of ``conditions`` (every ``name == value``); "" for none."""
    wanted = normalised(conditions)
    return " and ".join(
        f"{LABELS_FIELD}[{_literal(name)}] == {_literal(value)}" for name, value in sorted(wanted.items())
    )


class LabelledMilvusStore(MilvusStore):
    """A ``MilvusStore`` whose collections hold each item's labels (module docstring)."""

    def _open_collection(self, collection: str) -> bool:
        created = super()._open_collection(collection)
        fields = {f["name"] for f in self._client.describe_collection(collection)["fields"]}
        if LABELS_FIELD not in fields:
            raise ValueError(
                f"collection {collection} on {self.where} has no {LABELS_FIELD!r} field (it was created for "
                "a single-machine gallery): a shared gallery needs a collection prefix of its own"
            )
        return created

    @property
    def where(self) -> str:
        from index.milvus_store import _safe_uri

        return _safe_uri(self.uri)

    def _create(self, collection: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(LABELS_FIELD, DataType.JSON)
        self._client.create_collection(
            collection, schema=schema, index_params=self._index_params(), consistency_level="Strong"
        )

    def add(
        self,
        ids: np.ndarray,
        vectors_by_task: dict[str, np.ndarray],
        labels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Store the vectors of ``ids`` in every task, each row with ``labels[i]`` (none: ``{}``)."""
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"{len(labels)} label sets for {len(ids)} ids")
        rows_labels = [normalised(one) for one in labels] if labels is not None else [{} for _ in ids]
        self._insert(ids, vectors_by_task, [{LABELS_FIELD: one} for one in rows_labels])

    def count(self, task: str) -> int:
        """Vectors under ``task``, read with ``Bounded`` consistency: a count (``GET /tasks``, ``/metrics``)
        need not wait for the server's next time tick as every ``Strong`` read does (measured on the test
        server's 50 ms tick: 63 ms a count, 9 ms bounded; a deployment's default tick is 200 ms, per task)."""
        check_task(task, self._tasks)
        with self._lock.read():
            rows = self._client.query(
                self.collections[task], filter="", output_fields=["count(*)"], consistency_level="Bounded"
            )
        return int(rows[0]["count(*)"])

    def add_task(self, task: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        raise NotImplementedError(
            "adding a task to a shared gallery is not supported yet: build a new gallery (collection prefix)"
        )

    def _limit(self, task: str, k: int) -> int:
        # No count first: on a server a Strong count waits for the next time tick, and a topk past the
        # rows held is answered with the rows there are.
        return min(k, MAX_LIMIT)

    def labels(self, task: str, ids: np.ndarray) -> dict[int, dict[str, LabelValue]]:
        """The labels stored with ``ids`` under ``task`` (those stored)."""
        check_task(task, self._tasks)
        wanted = np.unique(as_ids(ids))
        out: dict[int, dict[str, LabelValue]] = {}
        with self._lock.read():
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK].tolist()
                for row in self._client.get(self.collections[task], ids=chunk, output_fields=[LABELS_FIELD]):
                    out[int(row["id"])] = dict(row[LABELS_FIELD] or {})
        return out
