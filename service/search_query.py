"""One search request from parameters to response: decode, embed (batched), rank, explain."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import retrieval
from service.embedding import decode, embed, split_by_task
from service.schemas import ModelInfo, SearchHit, SearchResponse, TaskWeightOut, Timing
from service.settings import Settings
from service.state import Loaded
from service.stored_vectors import stored_vectors
from service.task_specs import WeightedTask, describe


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


async def query_vectors(
    loaded: Loaded, params: SearchParams, image: bytes | None, settings: Settings, timing: dict[str, float]
) -> dict[str, np.ndarray]:
    """The query's vector under each needed task (every task when explaining)."""
    wanted = loaded.tasks if params.explain else [t.name for t in params.tasks]
    if params.by_id is not None:
        start = time.perf_counter()
        vectors = await run_in_threadpool(stored_vectors, loaded.gallery, params.by_id, wanted)
        timing["search"] += (time.perf_counter() - start) * 1000
        return vectors
    assert image is not None
    start = time.perf_counter()
    decoded = await decode(image, settings.max_image_pixels)
    timing["decode"] = (time.perf_counter() - start) * 1000
    task_ids = None if params.explain else tuple(t.index for t in params.tasks)
    result = await embed(loaded, [decoded.image], task_ids, settings.retry_after_s)
    timing["queue"] = result.queue_s * 1000
    timing["embed"] = result.embed_s * 1000
    return split_by_task(result.vectors[0], wanted)


def _rank_and_explain(
    loaded: Loaded, params: SearchParams, vectors: dict[str, np.ndarray], candidate_factor: int
) -> list[retrieval.Hit]:
    allowed = retrieval.allowed_ids(loaded.gallery, params.filters)
    ranked = retrieval.rank(
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
    explained = retrieval.explain(loaded.gallery, vectors, [i for i, _ in ranked]) if params.explain else None
    return retrieval.hits(loaded.gallery, ranked, explained)


async def search(
    loaded: Loaded, params: SearchParams, image: bytes | None, settings: Settings
) -> SearchResponse:
    timing = {"decode": 0.0, "queue": 0.0, "embed": 0.0, "search": 0.0}
    vectors = await query_vectors(loaded, params, image, settings, timing)
    start = time.perf_counter()
    found = await run_in_threadpool(_rank_and_explain, loaded, params, vectors, settings.candidate_factor)
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
