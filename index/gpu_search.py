"""Exact inner-product search as a torch matmul + top-k, used by the faiss backend on CUDA machines.

The PyPI faiss GPU wheels carry no kernels for H100/H200 (sm_90), so exact GPU search is done in torch
(a faiss GPU build is never used, even where one is installed: one exact path to test is simpler, and on
an H200 the matmul answers one query over 1M×128 in about 0.2 ms):
the gallery of one task lives on the device as a (N, D) matrix, a query batch is one matmul against it
followed by ``topk``. Filters become a boolean mask over the gallery rows whose excluded scores are set
to ``-inf`` before ``topk``. The computation is the same on any torch device, so the CPU path is tested
for agreement with faiss on machines without a GPU.

``dtype`` may be float16 on CUDA to halve memory and bandwidth; scores then differ from float32 by about
1e-3, and ids can swap only between near ties. The default is float32 (same results as faiss within
float rounding).
"""

from __future__ import annotations

import numpy as np
import torch

from index.store import PAD_ID, SearchResult


def cuda_available() -> bool:
    return torch.cuda.is_available()


class TorchExactSearcher:
    """An immutable device copy of one task's vectors and ids."""

    def __init__(
        self, ids: np.ndarray, vectors: np.ndarray, device: str, dtype: torch.dtype = torch.float32
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(
            self.device, dtype
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        num_queries = queries.shape[0]
        out_ids = np.full((num_queries, k), PAD_ID, dtype=np.int64)
        out_scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        if not len(self) or not num_queries or k <= 0:
            return SearchResult(out_ids, out_scores)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device, self.dtype)
        scores = (q @ self.vectors.T).float()
        if allowed is not None:
            mask = torch.isin(self.ids, torch.from_numpy(allowed.astype(np.int64)).to(self.device))
            scores.masked_fill_(~mask, -torch.inf)
        top = min(k, len(self))
        top_scores, top_rows = torch.topk(scores, top, dim=1)
        top_ids = self.ids[top_rows]
        # Rows excluded by the filter may fill the tail of top-k; they are padding, not results.
        top_ids = torch.where(torch.isinf(top_scores), torch.full_like(top_ids, PAD_ID), top_ids)
        out_ids[:, :top] = top_ids.cpu().numpy()
        out_scores[:, :top] = top_scores.cpu().numpy()
        return SearchResult(out_ids, out_scores)
