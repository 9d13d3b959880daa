"""One search request from parameters to response: decode, embed (batched), rank, explain.

A ``?by_id=`` query takes the item's stored embeddings straight from the store (``Gallery.vectors``): exact
copies for exact indexes, the decoded approximation for an IVF-PQ index (re-normalised here, as queries
always are). An item that has metadata but no vector under a task (removed meanwhile, or a store that a
crash left behind) is ``VectorUnavailable``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from anyio.to_thread import run_sync

from index.gallery import Gallery
from index.store import UnknownIdError
from service.runtime import ranking
from service.runtime.embedding import embed, prepare, split_by_task
from service.runtime.errors import ImageNotFound, VectorUnavailable
from service.runtime.loaded import Loaded
from service.runtime.queries import WeightedTask, describe
from service.schemas import ModelInfo, SearchHit, SearchResponse, TaskWeightOut, Timing
from service.settings import Settings


@dataclass(frozen=True)
class SearchParams:
    tasks: list[WeightedTask]
    k: int
    offset: int
    min_score: float | None
    filters: dict[str, int]
    explain: bool
    by_id: int | None


def image_url(item_id: int, has_blob: bool) -> str | None:
    return f"/images/{item_id}/content" if has_blob else None


def stored_vectors(gallery: Gallery, item_id: int, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """The stored, re-normalised vector of ``item_id`` under each of ``tasks``."""
    if not gallery.items([item_id]):
        raise ImageNotFound(item_id)
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        try:
            vector = gallery.vectors([item_id], task)[0]
        except UnknownIdError:
            raise VectorUnavailable(
                f"the index holds no stored vector of image {item_id} under {task!r}",
                {"id": item_id, "task": task},
            ) from None
        norm = float(np.linalg.norm(vector))
        out[task] = vector / norm if norm > 0 else vector
    return out


async def query_vectors(
    loaded: Loaded, params: SearchParams, image: bytes | None, settings: Settings, timing: dict[str, float]
) -> dict[str, np.ndarray]:
    """The query's vector under each needed task (every task when explaining)."""
    wanted = loaded.tasks if params.explain else [t.name for t in params.tasks]
    if params.by_id is not None:
        start = time.perf_counter()
        vectors = await run_sync(stored_vectors, loaded.gallery, params.by_id, wanted)
        timing["search"] += (time.perf_counter() - start) * 1000
        return vectors
    assert image is not None
    start = time.perf_counter()
    prepared = await run_sync(
        prepare, [image], settings.max_image_pixels, loaded.decode_budget, loaded.run.preprocess
    )
    timing["decode"] = (time.perf_counter() - start) * 1000
    task_ids = None if params.explain else tuple(t.index for t in params.tasks)
    result = await embed(loaded, prepared.pixels, task_ids, settings.retry_after_s)
    timing["queue"] = result.queue_s * 1000
    timing["embed"] = result.embed_s * 1000
    return split_by_task(result.vectors[0], wanted)


def _rank_and_explain(
    loaded: Loaded, params: SearchParams, vectors: dict[str, np.ndarray], candidate_factor: int
) -> list[ranking.Hit]:
    allowed = ranking.allowed_ids(loaded.gallery, params.filters)
    ranked = ranking.rank(
        loaded.gallery,
        params.tasks,
        vectors,
        k=params.k,
        offset=params.offset,
        min_score=params.min_score,
        allowed=allowed,
        exclude=[params.by_id] if params.by_id is not None else [],
        candidate_factor=candidate_factor,
    )
    explained = ranking.explain(loaded.gallery, vectors, [i for i, _ in ranked]) if params.explain else None
    return ranking.hits(loaded.gallery, ranked, explained)


async def search(
    loaded: Loaded, params: SearchParams, image: bytes | None, settings: Settings
) -> SearchResponse:
    timing = {"decode": 0.0, "queue": 0.0, "embed": 0.0, "search": 0.0}
    vectors = await query_vectors(loaded, params, image, settings, timing)
    start = time.perf_counter()
    found = await run_sync(_rank_and_explain, loaded, params, vectors, settings.candidate_factor)
    timing["search"] += (time.perf_counter() - start) * 1000
    results = [
        SearchHit(
            id=hit.id,
            rank=params.offset + position + 1,
            score=round(hit.score, 6),
            labels=hit.record.labels,
            image_url=image_url(hit.id, hit.record.has_blob),
            similarities=hit.similarities,
        )
        for position, hit in enumerate(found)
    ]
    return SearchResponse(
        task=describe(params.tasks),
        tasks=[TaskWeightOut(task=t.name, weight=t.weight) for t in params.tasks],
        query_id=params.by_id,
        results=results,
        model=ModelInfo(name=loaded.model_name, hash=loaded.run.model_hash),
        index_generation=loaded.writer.generation(),
        timing_ms=Timing(**{key: round(value, 3) for key, value in timing.items()}),
    )
