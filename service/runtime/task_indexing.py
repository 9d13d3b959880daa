"""Indexing a task of the served run while the service serves: ``POST /admin/tasks/{task}/index``.

A child run from ``modret task add``, served through ``POST /admin/reload``, lists its new task as not
indexed. The service holds the gallery for writing, so ``modret index add-task`` cannot run beside it;
``TaskIndexer.start`` does the same work in a background thread instead. ``Gallery.add_task`` embeds the
gallery's stored images under that task only (the task-independent prefix once per image) while searches
and uploads go on, then settles what was added or removed meanwhile with writes paused and makes the new
index durable (uploads arriving then wait for it). ``on_done`` then lets the app serve the task. One job
runs at a time; ``status`` is what ``GET /admin/tasks/{task}/index`` answers. ``remove`` (``DELETE
/admin/tasks/{task}/index``) drops a task's index the same way, e.g. one the served run no longer has,
which makes uploads refuse until then. A failed job changes nothing (the gallery keeps its tasks) and says
why; starting it again retries it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from index.gallery import Gallery, GalleryError
from index.gallery_files import StorageFull
from index.tasks import ImagesNotStoredError
from service.runtime.errors import Conflict, InsufficientStorage, NotFound, Unavailable
from service.runtime.loaded import Loaded
from service.runtime.queries import resolve_task

log = logging.getLogger("service.tasks")

JobState = Literal["running", "done", "failed"]


@dataclass(frozen=True)
class TaskIndexJob:
    task: str
    state: JobState
    total: int  # gallery items when the job started
    embedded: int = 0
    error: str | None = None
    started_at: float = field(default_factory=time.time)  # Unix seconds
    finished_at: float | None = None


class TaskIndexer:
    """At most one background task-indexing job per service, and the last job of each task."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads  # torch intra-op threads of the job (the model thread's own setting)
        self._lock = threading.Lock()
        self._jobs: dict[str, TaskIndexJob] = {}
        self._running: str | None = None

    def status(self, task: str) -> TaskIndexJob | None:
        with self._lock:
            return self._jobs.get(task)

    def start(self, loaded: Loaded, name: str, on_done: Callable[[str], None]) -> TaskIndexJob:
        """Start indexing the run's task ``name`` (any case) over ``loaded``'s gallery (blocking only for
        the checks); raises ``UnknownTask`` or ``Conflict`` saying why it cannot start."""
        task = resolve_task(name, loaded.tasks)
        if task in loaded.indexed:
            raise Conflict(
                f"the gallery already has an index for {task}", {"task": task}, code="task_already_indexed"
            )
        gallery = _local(loaded, task)
        missing = gallery.metadata.count_without_blobs()
        if missing:
            raise Conflict(
                f"{missing} gallery images were not stored (built with --no-store-images), so the service "
                f"cannot embed them under {task}: stop it and run `modret index add-task --run RUN --index "
                f"{gallery.root} --task {task} --images DIR` with the original images",
                {"task": task, "images_not_stored": missing},
                code="images_not_stored",
            )
        with self._lock:
            if self._running is not None:
                raise Conflict(
                    f"the gallery is being indexed under {self._running}; wait for that job "
                    f"(GET /admin/tasks/{self._running}/index) and start this one after",
                    {"task": task, "running": self._running},
                    code="indexing_in_progress",
                )
            job = TaskIndexJob(task, "running", total=gallery.metadata.count())
            self._jobs[task], self._running = job, task
        thread = threading.Thread(
            target=self._run, args=(loaded, gallery, task, on_done), name=f"modret-index-{task}", daemon=True
        )
        thread.start()
        return job

    def remove(self, loaded: Loaded, name: str) -> str:
        """Drop the gallery's index of task ``name`` (any case) durably, blocking; returns the task. For a
        task the run no longer has (uploads are refused until then) or one to index anew."""
        task = resolve_task(name, list(dict.fromkeys([*loaded.gallery.tasks, *loaded.tasks])))
        gallery = _local(loaded, task)
        with self._lock:  # no job starts meanwhile; one running is not for an indexed task
            # Checked under the lock: of two removals at once, the second finds the task gone.
            if task not in gallery.tasks:
                message = f"the gallery has no index for {task}: nothing to drop"
                raise NotFound(message, {"task": task, "tasks": list(gallery.tasks)}, code="no_task_index")
            if len(gallery.tasks) == 1:
                raise Conflict(f"{task} is the gallery's only task: it keeps at least one", {"task": task})
            if self._running is not None:
                raise Conflict(
                    f"the gallery is being indexed under {self._running}; wait for that job",
                    {"task": task, "running": self._running},
                    code="indexing_in_progress",
                )
            try:
                gallery.remove_task(task)  # writes wait it out (Gallery.change_tasks)
            except StorageFull as e:  # the change found no room on the disk: undone, writes go on
                raise InsufficientStorage(str(e)) from e
            except GalleryError as e:  # the gallery could not snapshot the change: it takes no writes now
                raise Unavailable(f"the gallery is not taking writes: {e}", code="gallery_unavailable") from e
            self._jobs.pop(task, None)
        log.info("task index removed", extra={"fields": {"task": task}})
        return task

    def _update(self, task: str, **changes: object) -> None:
        with self._lock:
            self._jobs[task] = replace(self._jobs[task], **changes)  # type: ignore[arg-type]

    def _run(self, loaded: Loaded, gallery: Gallery, task: str, on_done: Callable[[str], None]) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # OpenMP keeps it per thread, as the model thread does
        embedded = 0

        def progress(count: int) -> None:
            nonlocal embedded
            embedded += count
            self._update(task, embedded=embedded)

        log.info("indexing task", extra={"fields": {"task": task, "items": self._jobs[task].total}})
        try:
            count = gallery.add_task(task, loaded.run, progress=progress)
            on_done(task)
        except ImagesNotStoredError as e:  # items uploaded without their bytes since the check
            self._finish(task, "failed", error=str(e))
        except Exception as e:  # the gallery is unchanged (Gallery.change_tasks); say why
            if isinstance(e, StorageFull):
                log.error("indexing task failed", extra={"fields": {"task": task, "reason": str(e)}})
                self._finish(task, "failed", error=str(e))
            else:
                log.exception("indexing task failed", extra={"fields": {"task": task}})
                self._finish(task, "failed", error=f"{type(e).__name__}: {e}")
        else:
            log.info("task indexed", extra={"fields": {"task": task, "items": count}})
            self._finish(task, "done", embedded=count)

    def _finish(self, task: str, state: JobState, **changes: object) -> None:
        with self._lock:
            self._jobs[task] = replace(
                self._jobs[task],
                state=state,
                finished_at=time.time(),
                **changes,  # type: ignore[arg-type]
            )
            self._running = None


def _local(loaded: Loaded, task: str) -> Gallery:
    """The served gallery when its task list can change here (not the replicas' shared one)."""
    if not isinstance(loaded.gallery, Gallery):
        raise Conflict(
            "changing the task list of the replicas' shared gallery is not supported yet: load a new "
            "shared gallery with the run (modret index load)",
            {"task": task},
            code="task_change_unsupported",
        )
    return loaded.gallery
