"""What one running app holds (``ServiceState``) and the typed dependencies routes declare.

Routes take ``state: StateDep`` (settings, metrics, readiness) or ``loaded: LoadedDep`` (the model and
gallery, 503 until ready and once shutdown began); keys are checked by ``ReaderKey`` / ``AdminKey``
(``service.api.auth``) in the router's or route's ``dependencies``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.runtime.errors import Unavailable
from service.runtime.loaded import Loaded
from service.runtime.task_indexing import TaskIndexer
from service.settings import Settings
from service.telemetry import ServiceMetrics


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    loaded: Loaded | None = None
    ready: bool = False  # startup (load + warm-up) finished
    startup_error: str | None = None  # why the run or gallery could not be loaded (``LOAD_ERRORS``)
    draining: bool = False  # shutdown requested: readiness reports 503, requests are still served
    stopped: bool = False  # lifespan shutdown began: no new work
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one POST /admin/reload at a time
    task_indexer: TaskIndexer = field(default_factory=TaskIndexer)  # POST /admin/tasks/{task}/index
    # Replaced by a reload, still serving the requests that began on them until they end.
    retired: list[Loaded] = field(default_factory=list)
    retiring: set[asyncio.Task[None]] = field(default_factory=set)

    def require(self) -> Loaded:
        """The loaded model and gallery, or ``Unavailable`` while starting or after shutdown began."""
        if self.loaded is None or not self.ready or self.stopped:
            reason = "shutting down" if self.stopped else "not ready (loading)"
            raise Unavailable(f"service is {reason}")
        return self.loaded

    def require_ready(self) -> Loaded:
        """As ``require``, and ``Unavailable`` as soon as a shutdown was requested (the readiness probe)."""
        loaded = self.require()
        if self.draining:
            raise Unavailable("service is shutting down")
        return loaded


# ``async``: they never block, so FastAPI calls them on the loop instead of hopping to a thread.
async def get_state(request: Request) -> ServiceState:
    state = request.app.state.modret
    assert isinstance(state, ServiceState)
    return state


async def get_loaded(request: Request) -> Loaded:
    return (await get_state(request)).require()


StateDep = Annotated[ServiceState, Depends(get_state)]
LoadedDep = Annotated[Loaded, Depends(get_loaded)]
