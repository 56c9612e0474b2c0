"""Diversity partition: coverage and speed of the fixed (released, r = 8) and geometric schedules.

Coverage (docs/flashvlm.md §9 (2); docs/diversity.md): K tight clusters on the unit sphere, N tokens in random order; the partition
keeps T_div = c·K tokens; we count trials in which some cluster lost every member, and the cover radius
max_v min_s (1 - cos). Speed: one partition of N random 1024-d tokens down to N/9, median of repeats after
a warm-up (the bench's `diversity_timing`).

    python benchmarks/diversity.py [--trials 100] [--out benchmarks/results/diversity.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from prunevlm.bench.diversity_partition import diversity_timing
from prunevlm.methods.diversity import bipartite_dedup


def clustered(num_tokens: int, clusters: int, dim: int, spread: float, generator: torch.Generator):
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.randint(clusters, (num_tokens,), generator=generator)
    labels[:clusters] = torch.arange(clusters)  # every cluster has members
    points = centres[labels] + spread * torch.randn(num_tokens, dim, generator=generator)
    return F.normalize(points, dim=-1), labels


def coverage(schedule: str, clusters: int, factor: float, trials: int, num_tokens: int = 576) -> dict:
    missed, radii = 0, []
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        points, labels = clustered(num_tokens, clusters, 64, 0.01, g)
        order = torch.randperm(num_tokens, generator=g)[None]
        kept = bipartite_dedup(points[None], order, int(factor * clusters), schedule=schedule)[0]
        missed += int(labels[kept].unique().numel() < clusters)
        radii.append(float((1 - points @ points[kept].T).amin(dim=1).max()) if kept.numel() else 2.0)
    return {"schedule": schedule, "clusters": clusters, "t_div": int(factor * clusters), "factor": factor,
            "trials_with_missed_cluster": missed, "trials": trials, "median_radius": statistics.median(radii)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/diversity.json")
    args = parser.parse_args()
    rows = [coverage(s, k, c, args.trials) for s in ("fixed", "geometric") for k in (16, 32, 64) for c in (1.0, 1.25, 1.5, 2.0)]
    print("| schedule | K | T_div | trials with a missed cluster | median radius (1 - cos) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['clusters']} | {r['t_div']} | {r['trials_with_missed_cluster']}/{r['trials']} | {r['median_radius']:.4f} |")
    timings = [diversity_timing(n, repeats=args.repeats) for n in (576, 2304, 4608)]
    print(f"\n| schedule | N | keep | rounds | median time ({torch.get_num_threads()} threads) |")
    print("|---|---|---|---|---|")
    for t in timings:
        for s in ("fixed", "geometric"):
            print(f"| {s} | {t['tokens']} | {t['keep']} | {t['rounds'][s]} | {t['median_ms'][s]:.1f} ms |")
    with open(args.out, "w") as f:
        json.dump({"coverage": rows, "speed": timings, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
