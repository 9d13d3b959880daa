"""The proxy loss: a normalised softmax over per-task class proxies, a training-only alternative to the
triplet loss.

Each task ``t`` has one learnable proxy per label value; an image's embedding under ``t`` is pulled
towards its value's proxy and pushed from the others' by a softmax cross-entropy over cosine
similarities at temperature ``τ`` ("Classification is a Strong Baseline for Deep Metric Learning",
Zhai & Wu, BMVC 2019; "No Fuss Distance Metric Learning using Proxies", Movshovitz-Attias et al., ICCV
2017). Every image in the batch gets a signal against every value at once, where a triplet loss only
sees the pairs its sampler happened to draw, so the same steps learn more; triplet accuracy still
measures the result (two images of one value sit near one proxy, closer than an image near another).

The proxies exist only while training: they are not part of the model, a run does not store them, and a
task's inference cost is unchanged. A checkpoint keeps them, so an interrupted run resumes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.data.base import UNKNOWN

PROXY_LR_SCALE = 10.0  # the proxies start from nothing and train at 10x the network's lr


class TaskProxies(nn.Module):
    """``num_values[t]`` proxies of ``dim`` per task; calling it gives the loss of a task-grouped batch."""

    valid: Tensor  # (T, V) bool: which of the V proxy slots are one of the task's values

    def __init__(self, num_values: Sequence[int], dim: int, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"the proxy temperature must be positive, got {temperature}")
        if not num_values or min(num_values) < 1:
            raise ValueError(f"every task needs at least one label value, got {list(num_values)}")
        self.temperature = temperature
        width = max(num_values)
        self.weight = nn.Parameter(torch.randn(len(num_values), width, dim) * 0.1)  # (T, V, D)
        valid = torch.arange(width).unsqueeze(0) < torch.tensor(list(num_values)).unsqueeze(1)
        self.register_buffer("valid", valid, persistent=False)

    def forward(self, embeddings: Tensor, values: Tensor, columns: np.ndarray) -> Tensor:
        """``embeddings`` (K, G, D): G images under task ``columns[k]``; ``values`` (K, G) their labels
        (``UNKNOWN`` takes no part). The mean cross-entropy of each known row against its value's proxy."""
        tasks = torch.from_numpy(np.asarray(columns, dtype=np.int64)).to(embeddings.device)
        proxies = F.normalize(self.weight[tasks], dim=-1)  # (K, V, D)
        cosine = torch.einsum("kgd,kvd->kgv", F.normalize(embeddings, dim=-1), proxies)  # (K, G, V)
        logits = (cosine / self.temperature).masked_fill(~self.valid[tasks].unsqueeze(1), float("-inf"))
        known = values != UNKNOWN  # (K, G)
        if not bool(known.any()):
            return embeddings.sum() * 0.0  # no label in the batch: nothing to learn, graph kept
        return F.cross_entropy(logits[known], values[known].long())
