"""The real request path of ``POST /search`` on a real server: where tensors reach the model and as what,
how often a search crosses threads, and the per-stage timings in the response and in ``/metrics``."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
import torch

from service.runtime.loaded import Loaded
from tests.factories import copy_gallery, face
from tests.service.api.server import Server, running_server, settings_for


@pytest.fixture(scope="module")
def server(
    run_dir: Path, gallery_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    index = copy_gallery(gallery_template, tmp_path_factory.mktemp("path") / "index")
    with running_server(settings_for(run_dir, index)) as running:
        yield running


def loaded_of(server: Server) -> Loaded:
    loaded = server.app.state.modret.loaded
    assert isinstance(loaded, Loaded)
    return loaded


def search(server: Server, params: Any, image: bytes | None = None) -> dict[str, Any]:
    files = {"image": ("q.png", image, "image/png")} if image is not None else None
    with server.client() as client:
        response = client.post("/search", params=params, files=files)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_tensors_reach_the_model_where_its_parameters_are(server: Server) -> None:
    """The model is made float64 in place: request tensors are made on the host as uint8 and float32, so
    any that is not moved and cast with the parameters breaks the search (as CPU tensors broke a CUDA
    model). Recorded: what crosses into the batcher, and every tensor any module of the model receives."""
    loaded = loaded_of(server)
    model = loaded.batcher.model
    submitted: list[torch.Tensor] = []
    seen: list[tuple[torch.device, torch.dtype, str]] = []
    original, original_inline = loaded.batcher.submit, loaded.batcher.run_if_idle

    def spy(pixels: torch.Tensor, task_ids: tuple[int, ...] | None) -> Any:
        submitted.append(pixels)
        return original(pixels, task_ids)

    def spy_inline(pixels: torch.Tensor, task_ids: tuple[int, ...] | None) -> Any:
        done = original_inline(pixels, task_ids)
        if done is not None:  # run on the request's thread; else it goes on to ``submit``
            submitted.append(pixels)
        return done

    def record(module: torch.nn.Module, args: tuple[object, ...]) -> None:
        name = type(module).__name__
        seen.extend((a.device, a.dtype, name) for a in args if isinstance(a, torch.Tensor))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    loaded.batcher.submit = spy  # type: ignore[method-assign]
    loaded.batcher.run_if_idle = spy_inline  # type: ignore[method-assign]
    before = search(server, {"task": "Smiling", "k": 5}, face(300)[0])
    model.double()
    try:
        after = search(server, [("task", "Smiling"), ("task", "Eyeglasses:-1"), ("k", "5")], face(300)[0])
        explained = search(server, {"task": "Smiling", "k": 5, "explain": "true"}, face(300)[0])
    finally:
        model.float()
        loaded.batcher.submit = original  # type: ignore[method-assign]
        loaded.batcher.run_if_idle = original_inline  # type: ignore[method-assign]
        for handle in handles:
            handle.remove()
    assert len(submitted) == 3
    assert all(p.dtype == torch.uint8 and p.device.type == "cpu" and p.ndim == 4 for p in submitted)
    doubled = seen[len(seen) // 3 :]  # the two searches after .double()
    assert {dtype for _, dtype, _ in doubled if dtype.is_floating_point} == {torch.float64}
    assert {device for device, _, _ in seen} == {model.device}
    assert any(dtype == torch.long for _, dtype, _ in seen)  # the task ids, on the device too
    assert [r["id"] for r in explained["results"]] == [r["id"] for r in before["results"]]
    assert after["results"] and len(explained["results"][0]["similarities"]) == len(loaded.tasks)


class HopCounter:
    """Wraps ``anyio.to_thread.run_sync`` (what FastAPI, Starlette and the runtime hop with) to record the
    functions sent to a worker thread."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.calls.append(f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}")
            return await original(func, *args, **kwargs)

        return counted


def test_a_search_crosses_threads_once(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = loaded_of(server)
    counter = HopCounter()
    monkeypatch.setattr(anyio.to_thread, "run_sync", counter.wrap(anyio.to_thread.run_sync))
    batches = loaded.batcher.batches_run
    search(server, {"task": "Smiling", "k": 5}, face(301)[0])
    runtime = [c for c in counter.calls if c.startswith("service.runtime.")]
    # one hop of our own: bytes -> pixels -> the batcher's vectors -> rank + explain + metadata + JSON
    assert runtime == ["service.runtime.search.run"], counter.calls
    # The dependencies (state, loaded model, key check) are async: no other hop at all.
    assert counter.calls == runtime, counter.calls
    assert loaded.batcher.batches_run == batches + 1
    counter.calls.clear()
    search(server, {"task": "Smiling", "k": 5, "by_id": 2, "explain": "true"})
    assert counter.calls == ["service.runtime.search.run"]
    assert loaded.batcher.batches_run == batches + 1  # a stored vector needs no model


def stage_counts(server: Server) -> dict[str, float]:
    with server.client() as client:
        text = client.get("/metrics").text
    pattern = r'^modret_search_stage_seconds_count\{stage="(\w+)"\} ([0-9.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_stage_timings_in_the_response_and_in_metrics(server: Server) -> None:
    before = stage_counts(server)
    assert set(before) == {"decode", "queue", "embed", "search", "respond"}
    body = search(server, {"task": "Black_Hair", "k": 3}, face(302)[0])
    timing = body["timing_ms"]
    assert set(timing) == {"decode", "queue", "embed", "search", "respond"}
    assert all(timing[stage] > 0 for stage in ("decode", "embed", "search", "respond"))
    after = stage_counts(server)
    for stage in ("decode", "embed", "search", "respond"):
        assert after[stage] == before[stage] + 1, stage
    by_id = search(server, {"task": "Black_Hair", "k": 3, "by_id": 1})["timing_ms"]
    assert by_id["decode"] == by_id["embed"] == 0 and by_id["search"] > 0
    final = stage_counts(server)
    assert final["decode"] == after["decode"] and final["search"] == after["search"] + 1
