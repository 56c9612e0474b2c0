"""The diversity partition (`methods.diversity.bipartite_dedup`) timed alone, outside any model, for both
schedules."""

from __future__ import annotations

import statistics
import time

import torch

from ..methods.diversity import bipartite_dedup


def diversity_timing(num_tokens: int = 4608, dim: int = 1024, repeats: int = 3) -> dict:
    """The diversity partition alone (default N = 4608, 8 frames x 576 tokens), keeping N/9, both schedules:
    median time after one untimed warm-up call, and the number of rounds."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, num_tokens, dim, generator=g)
    order = torch.randperm(num_tokens, generator=g)[None]
    timings, rounds = {}, {}
    for schedule in ("fixed", "geometric"):
        times, stats = [], {}
        for _ in range(repeats + 1):
            start = time.perf_counter()
            bipartite_dedup(features, order, num_tokens // 9, schedule=schedule, stats=stats)
            times.append(time.perf_counter() - start)
        timings[schedule], rounds[schedule] = 1000 * statistics.median(times[1:]), stats["rounds"]
    return {"tokens": num_tokens, "dim": dim, "keep": num_tokens // 9, "median_ms": timings, "rounds": rounds,
            "threads": torch.get_num_threads()}
