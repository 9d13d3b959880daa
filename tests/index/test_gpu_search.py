"""The torch matmul + top-k exact search agrees with faiss (on CPU here, on CUDA where available)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from index.gpu_search import TorchExactSearcher
from tests.index.conftest import unit_vectors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def faiss_reference(
    ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, ids)
    scores, found = index.search(queries, k)
    return found, scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_agrees_with_faiss(device: str, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(rng, 2000, 32), unit_vectors(rng, 16, 32)
    ids = rng.permutation(10**6)[:2000].astype(np.int64)
    searcher = TorchExactSearcher(ids, vectors, device, dtype)
    result = searcher.search(queries, 10)
    want_ids, want_scores = faiss_reference(ids, vectors, queries, 10)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    np.testing.assert_allclose(result.scores, want_scores, atol=tolerance)
    # Ids agree wherever the score is not within tolerance of a neighbour (a tie at that precision).
    gaps = np.diff(want_scores, axis=1)
    clear = np.ones_like(want_ids, dtype=bool)
    clear[:, 1:] &= np.abs(gaps) > tolerance
    clear[:, :-1] &= np.abs(gaps) > tolerance
    assert (result.ids[clear] == want_ids[clear]).all()


def test_filter_mask_and_padding() -> None:
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 20, 8)
    ids = np.arange(100, 120, dtype=np.int64)
    searcher = TorchExactSearcher(ids, vectors, "cpu")
    result = searcher.search(vectors[:2], 5, allowed=np.array([103, 104, 999]))
    assert set(result.ids[0, :2].tolist()) == {103, 104}
    assert (result.ids[:, 2:] == -1).all() and np.isneginf(result.scores[:, 2:]).all()
    wide = searcher.search(vectors[:1], 25)
    assert sorted(wide.ids[0, :20].tolist()) == ids.tolist() and (wide.ids[0, 20:] == -1).all()
    assert wide.ids[0, 0] == 100
