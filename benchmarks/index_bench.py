"""Benchmark of the index layer over random unit vectors of the model's embedding size (not a test).

For every gallery size and index kind: build time (``add``, including IVF-PQ training), single-query
latency (p50/p99) and QPS, batched QPS, recall@10 against exact search, and memory per million vectors
(the serialized index size, which is what a generation holds on disk and what faiss keeps in RAM).
Exact search runs through faiss (``flat``) and through the torch matmul + top-k path on CPU
(``flat-torch-cpu``) and, when CUDA is available, on the GPU in fp32 and fp16 (``torch-cuda-*``).

    .venv/bin/python benchmarks/index_bench.py --sizes 10000 100000 [--kinds flat hnsw ivfpq] [--json F]

Random unit vectors are the hardest case for approximate indexes (no cluster structure), so the recall
figures are a lower bound for real embeddings.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from report import json_out, write_json

from index.faiss_store import FaissStore
from index.gpu_search import TorchExactSearcher
from model.network import ModelConfig

TASK = "bench"
K = 10


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_searches(search: Any, queries: np.ndarray, single: int) -> dict[str, float]:
    search(queries[:1])  # warm-up (lazy device copies, thread pools)
    latencies = []
    for q in queries[:single]:
        start = time.perf_counter()
        search(q[None])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    search(queries)
    batched = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "single_qps": float(1e3 / lat.mean()),
        "batched_qps": float(len(queries) / batched),
    }


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], e)) / K for f, e in zip(found, exact, strict=True)]))


def bench_size(n: int, dim: int, kinds: list[str], num_queries: int, single: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(n)
    vectors, queries = unit(rng, n, dim), unit(rng, num_queries, dim)
    ids = np.arange(n, dtype=np.int64)
    rows: list[dict[str, Any]] = []
    exact_ids: np.ndarray | None = None
    for kind in ["flat", *[k for k in kinds if k != "flat"]]:
        with tempfile.TemporaryDirectory() as tmp:
            store = FaissStore(
                Path(tmp), tasks=[TASK], dim=dim, model_hash="bench", kind=kind, search_device="faiss"
            )
            start = time.perf_counter()
            store.add(ids, {TASK: vectors})
            build_s = time.perf_counter() - start
            found = store.search(TASK, queries, K).ids
            if kind == "flat":
                exact_ids = found
            assert exact_ids is not None
            start = time.perf_counter()
            size = sum(entry.size for entry in store.save().files.values())
            save_s = time.perf_counter() - start
            row = {
                "n": n,
                "kind": kind,
                "build_s": build_s,
                "save_s": save_s,
                "recall@10": recall(found, exact_ids),
            }
            row |= timed_searches(lambda q, s=store: s.search(TASK, q, K), queries, single)
            row["mb_per_million"] = size / n * 1e6 / 2**20
            rows.append(row)
            print(row, flush=True)
    devices = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        devices += [("cuda", torch.float32), ("cuda", torch.float16)]
    for device, dtype in devices:
        start = time.perf_counter()
        searcher = TorchExactSearcher(ids, vectors, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        build_s = time.perf_counter() - start
        found = searcher.search(queries, K).ids
        assert exact_ids is not None
        name = f"flat-torch-{device}" + ("-fp16" if dtype == torch.float16 else "")
        row = {
            "n": n,
            "kind": name,
            "build_s": build_s,
            "save_s": float("nan"),
            "recall@10": recall(found, exact_ids),
        }
        row |= timed_searches(lambda q, s=searcher: s.search(q, K), queries, single)
        row["mb_per_million"] = dim * (2 if dtype == torch.float16 else 4) + 8  # vectors + int64 id
        rows.append(row)
        print(row, flush=True)
    return rows


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, faiss {faiss.__version__}, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    parser.add_argument("--dim", type=int, default=ModelConfig(task_names=["t"]).embedding_dim)
    parser.add_argument("--queries", type=int, default=1000, help="batch size of the batched measurement")
    parser.add_argument("--single", type=int, default=200, help="single queries timed one by one")
    parser.add_argument("--json", type=json_out, help="write all rows here")
    args = parser.parse_args()
    print(f"machine: {machine()}; dim {args.dim}", flush=True)
    rows = [row for n in args.sizes for row in bench_size(n, args.dim, args.kinds, args.queries, args.single)]
    columns = (
        "n | index | build s | save s | p50 ms | p99 ms | single QPS | batched QPS | recall@10 | MB per 1M"
    )
    print(f"\n| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['save_s']:.2f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['single_qps']:.0f} | {r['batched_qps']:.0f} | {r['recall@10']:.3f} | "
            f"{r['mb_per_million']:.0f} |"
        )
    if args.json:
        write_json(args.json, {"machine": machine(), "dim": args.dim, "rows": rows})


if __name__ == "__main__":
    main()
