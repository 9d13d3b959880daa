"""Response bodies of the API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from model.data.base import LabelValue


class ModelInfo(BaseModel):
    name: str
    hash: str


class TaskWeightOut(BaseModel):
    task: str
    weight: float


class SearchHit(BaseModel):
    id: int
    rank: int
    score: float
    labels: dict[str, LabelValue]
    image_url: str | None = Field(None, description="the image's bytes, when the gallery stores them")
    similarities: dict[str, float] | None = Field(
        None, description="with explain=true: similarity to the query under every task"
    )


class Timing(BaseModel):
    """Milliseconds per stage of this search (``/metrics`` has the same stages as histograms)."""

    decode: float
    queue: float
    embed: float
    search: float
    respond: float = Field(0.0, description="metadata and response building (JSON encoding excluded)")


class SearchResponse(BaseModel):
    task: str
    tasks: list[TaskWeightOut]
    query_id: int | None = Field(None, description="the gallery image queried with (by_id)")
    results: list[SearchHit]
    model: ModelInfo
    index_generation: int | None
    timing_ms: Timing


class TaskInfo(BaseModel):
    name: str
    index: int
    description: str
    gallery_size: int
    indexed: bool = Field(
        True,
        description="whether the gallery has an index for it (false: `POST /admin/tasks/{task}/index`, or "
        "`modret index add-task` with the service stopped)",
    )
    accuracy: float | None = Field(None, description="the model's test triplet accuracy, when known")
    leakage: float | None = Field(
        None,
        description="how much the task's top 10 share the query's other attributes beyond chance (0: not "
        "at all; `modret eval` defines it), on the run's test split, when known",
    )
    metrics: dict[str, float] | None = None


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    model: ModelInfo


class ReloadResponse(BaseModel):
    model: ModelInfo
    tasks: list[str] = Field(description="the tasks searchable now")
    not_indexed: list[str] = Field(description="the run's tasks the gallery has no index for")


class TaskIndexStatus(BaseModel):
    task: str
    state: Literal["running", "done", "failed"]
    total: int = Field(description="gallery images when the job started")
    embedded: int = Field(description="images embedded under the task so far")
    error: str | None = Field(None, description="why the job failed (the gallery is then unchanged)")
    started_at: str
    finished_at: str | None = None


class TaskIndexRemoved(BaseModel):
    task: str = Field(description="the task whose index was dropped")
    tasks: list[str] = Field(description="the tasks searchable now")
    not_indexed: list[str] = Field(description="the run's tasks the gallery has no index for")


class ImageInfo(BaseModel):
    id: int
    source: str
    width: int
    height: int
    labels: dict[str, LabelValue]
    added_at: str
    image_url: str | None


class ImagePage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[ImageInfo]


class AddedImage(BaseModel):
    id: int
    filename: str
    duplicate: bool


class AddImagesResponse(BaseModel):
    items: list[AddedImage]
    index_generation: int | None


class Deleted(BaseModel):
    id: int
    deleted: bool


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: ModelInfo
    tasks: int
    gallery_size: int
    index_generation: int | None
