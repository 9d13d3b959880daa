"""One search request from parameters to response: decode, embed (batched), rank, explain, respond.

A search crosses threads as few times as it can: one worker-thread hop (``run``) turns the untrusted bytes
into uint8 pixels (``embedding.prepare``), hands them to the batcher's model thread and waits for their
vectors there, then ranks, explains, reads the hits' metadata and encodes the JSON body. The event loop only
awaits that one hop; each cross-thread wake-up costs a scheduling delay on a busy machine, so the vectors do
not come back to the loop in between. Each stage's time goes into the response's ``timing_ms`` and the
``/metrics`` histograms.

A ``?by_id=`` query takes the item's stored embeddings straight from the store
(``ServedGallery.vectors``): exact copies for exact indexes, the decoded approximation for an IVF-PQ index
(re-normalised here, as queries always are). An item that has metadata but no vector under a task (removed
meanwhile, or a store that a crash left behind) is ``VectorUnavailable``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import anyio.to_thread
import numpy as np

from index.served import ServedGallery
from index.store import UnknownIdError
from model.data.base import LabelValue
from service.runtime import embedding, ranking
from service.runtime.embedding import check_room, embed_blocking, prepare, split_by_task
from service.runtime.errors import ImageNotFound, VectorUnavailable
from service.runtime.loaded import Loaded
from service.runtime.queries import WeightedTask, describe
from service.schemas import ModelInfo, SearchHit, SearchResponse, TaskWeightOut, Timing
from service.settings import Settings
from service.telemetry import ServiceMetrics


@dataclass(frozen=True)
class SearchParams:
    tasks: list[WeightedTask]
    k: int
    offset: int
    min_score: float | None
    filters: dict[str, LabelValue]
    explain: bool
    by_id: int | None


def image_url(item_id: int, has_blob: bool) -> str | None:
    return f"/images/{item_id}/content" if has_blob else None


def stored_vectors(gallery: ServedGallery, item_id: int, tasks: Sequence[str]) -> dict[str, np.ndarray]:
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


def query_task_ids(params: SearchParams) -> tuple[int, ...] | None:
    """The tasks the query image is embedded under (None: every task, to explain)."""
    return None if params.explain else tuple(t.index for t in params.tasks)


def admitted(loaded: Loaded, params: SearchParams, settings: Settings) -> AbstractContextManager[None]:
    """The search counted against the model's bound while the block runs, or ``Overloaded`` on entry
    (``embedding.admitted``); a search by id does not use the model and is always admitted."""
    if params.by_id is not None:
        return nullcontext()
    return embedding.admitted(loaded, 1, query_task_ids(params), settings.retry_after_s)


def embedded_query(
    loaded: Loaded, params: SearchParams, image: bytes, settings: Settings, timing: dict[str, float]
) -> dict[str, np.ndarray]:
    """Blocking: the query image's vector under each needed task (every task when explaining)."""
    task_ids = query_task_ids(params)
    check_room(loaded, 1, task_ids, settings.retry_after_s)  # overloaded since the body came: not decoded
    start = time.perf_counter()
    with loaded.batcher.expecting():  # a batch forming now may wait for this request's pixels
        prepared = prepare([image], settings.max_image_pixels, loaded.decode_budget, loaded.run.preprocess)
    timing["decode"] = (time.perf_counter() - start) * 1000
    result = embed_blocking(
        loaded, prepared.pixels, task_ids, settings.retry_after_s, settings.request_timeout_s
    )
    timing["queue"] = result.queue_s * 1000
    timing["embed"] = result.embed_s * 1000
    wanted = loaded.tasks if params.explain else [t.name for t in params.tasks]
    return split_by_task(result.vectors[0], wanted)


def _rank_and_explain(
    loaded: Loaded, params: SearchParams, vectors: dict[str, np.ndarray], candidate_factor: int
) -> tuple[list[tuple[int, float]], dict[int, dict[str, float]] | None]:
    ranked = ranking.rank(
        loaded.gallery,
        params.tasks,
        vectors,
        k=params.k,
        offset=params.offset,
        min_score=params.min_score,
        filter=params.filters,
        exclude=[params.by_id] if params.by_id is not None else [],
        candidate_factor=candidate_factor,
    )
    explained = None
    if params.explain:  # under the tasks the gallery can search (a run task may have no index yet)
        searchable = {task: vector for task, vector in vectors.items() if task in loaded.indexed}
        explained = ranking.explain(loaded.gallery, searchable, [i for i, _ in ranked])
    return ranked, explained


def _response(
    loaded: Loaded, params: SearchParams, found: Sequence[ranking.Hit], timing: dict[str, float]
) -> SearchResponse:
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


def answer(
    loaded: Loaded,
    params: SearchParams,
    vectors: dict[str, np.ndarray] | None,
    candidate_factor: int,
    timing: dict[str, float],
) -> bytes:
    """Blocking, one hop: (the ``by_id`` item's stored vectors,) rank, explain, metadata, the JSON body.
    ``timing`` gets ``search`` and ``respond``; the body's ``respond`` excludes its own encoding, the
    ``timing`` left behind includes it."""
    start = time.perf_counter()
    if vectors is None:
        assert params.by_id is not None
        wanted = loaded.indexed if params.explain else [t.name for t in params.tasks]
        vectors = stored_vectors(loaded.gallery, params.by_id, wanted)
    ranked, explained = _rank_and_explain(loaded, params, vectors, candidate_factor)
    ranked_at = time.perf_counter()
    timing["search"] = (ranked_at - start) * 1000
    found = ranking.hits(loaded.gallery, ranked, explained)
    timing["respond"] = (time.perf_counter() - ranked_at) * 1000
    body = _response(loaded, params, found, timing).model_dump_json().encode()
    timing["respond"] = (time.perf_counter() - ranked_at) * 1000
    return body


def run(
    loaded: Loaded, params: SearchParams, image: bytes | None, settings: Settings
) -> tuple[bytes, dict[str, float]]:
    """Blocking, the search's one hop: the response body and its stage timings."""
    timing = {"decode": 0.0, "queue": 0.0, "embed": 0.0, "search": 0.0, "respond": 0.0}
    vectors = None
    if params.by_id is None:
        assert image is not None
        vectors = embedded_query(loaded, params, image, settings, timing)
    return answer(loaded, params, vectors, settings.candidate_factor, timing), timing


async def search(
    loaded: Loaded,
    params: SearchParams,
    image: bytes | None,
    settings: Settings,
    metrics: ServiceMetrics | None = None,
) -> bytes:
    """The search's JSON response body (a ``SearchResponse``)."""
    body, timing = await anyio.to_thread.run_sync(run, loaded, params, image, settings)
    if metrics is not None:
        metrics.observe_stages(timing)
    return body
