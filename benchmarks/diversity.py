"""Diversity partition: coverage and speed of the fixed (released, r = 8) and geometric schedules.

Coverage (docs/flashvlm.md §9 (2); docs/diversity.md): K tight clusters on the unit sphere, N tokens in random order; the partition
keeps T_div = c·K tokens; we count trials in which some cluster lost every member, and the cover radius
max_v min_s (1 - cos). Speed: one partition of N random 1024-d tokens down to N/9, median of repeats after
a warm-up (the bench's `diversity_timing`).

Clip coverage (`--clip`; docs/diversity.md, "Clip scale"): the exact rounds against `dedup_segment` on a
video of 32 frames x 128 tokens: a static scene of 16 regions and K objects, each seen in a run of 2 to 12
consecutive frames (tight clusters, spread 0.01, 64-d); the residual in random order; the partition keeps
T_div = c·(K + 16); trials in which some object lost every token, and the median cover radius over all
tokens, per segment length and schedule, with each one's time. The same clips for DivPrune and CDPruner
(without text: a pure cosine DPP), which keep c·(K + 16) tokens of the whole clip: the exact greedy against
`clip_segment` 8 (docs/baselines.md, "Clip scale").

    python benchmarks/diversity.py [--trials 100] [--out benchmarks/results/diversity.json]
    python benchmarks/diversity.py --clip [--trials 20] [--out benchmarks/results/diversity-clip.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from prunevlm.bench.diversity_partition import diversity_timing
from prunevlm.methods import make_method
from prunevlm.methods.diversity import bipartite_dedup, segmented_dedup


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


def clip_objects(frames: int, size: int, objects: int, generator: torch.Generator, regions: int = 16):
    """Unit tokens of a clip [frames·size, 64], each token's object (-1: the scene) and frame. The scene is
    static: each position shows one of `regions` region vectors in every frame; an object replaces 3 tokens
    of each of a run of 2 to 12 consecutive frames. Every token has noise of spread 0.01."""
    frame = torch.arange(frames * size) // size
    scene = F.normalize(torch.randn(regions, 64, generator=generator), dim=-1)
    centres = scene[torch.randint(regions, (size,), generator=generator)].repeat(frames, 1)
    labels = torch.full((frames * size,), -1)
    for obj, centre in enumerate(F.normalize(torch.randn(objects, 64, generator=generator), dim=-1)):
        length = int(torch.randint(2, 13, (1,), generator=generator))
        start = int(torch.randint(0, frames - length + 1, (1,), generator=generator))
        for f in range(start, start + length):
            slots = f * size + torch.randperm(size, generator=generator)[:3]
            labels[slots], centres[slots] = obj, centre
    points = F.normalize(centres + 0.01 * torch.randn(frames * size, 64, generator=generator), dim=-1)
    return points, labels, frame


def clip_trials(choose, objects: int, factor: float, trials: int, frames: int, size: int, regions: int) -> dict:
    """Trials in which `choose(points, keep, frame, generator)` (the kept token indices), keeping
    factor·(objects + regions) tokens of the clip, lost an object, and the median cover radius
    max_v min_s (1 − cos) over all tokens; with the median time of one choice."""
    missed, radii, seconds = 0, [], []
    keep = int(factor * (objects + regions))
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        points, labels, frame = clip_objects(frames, size, objects, g, regions)
        start = time.perf_counter()
        kept = choose(points, keep, frame, g)
        seconds.append(time.perf_counter() - start)
        missed += int(labels[kept][labels[kept] >= 0].unique().numel() < objects)
        radii.append(float((1 - points @ points[kept].T).amin(dim=1).max()))
    return {"objects": objects, "regions": regions, "kept": keep, "factor": factor,
            "trials_with_missed_object": missed, "trials": trials,
            "median_radius": statistics.median(radii), "median_ms": 1000 * statistics.median(seconds)}


def clip_coverage(segment: int | None, schedule: str, objects: int, factor: float, trials: int,
                  frames: int = 32, size: int = 128, regions: int = 16) -> dict:
    """`clip_trials` of the partition over a random residual order, exact (segment None) or in segments."""

    def choose(points, keep, frame, g):
        order = torch.randperm(frames * size, generator=g)[None]
        return (bipartite_dedup(points[None], order, keep, schedule=schedule) if segment is None else
                segmented_dedup(points[None], order, keep, frame, segment, schedule=schedule))[0]

    row = clip_trials(choose, objects, factor, trials, frames, size, regions)
    return {"segment": segment, "schedule": schedule, "t_div": row.pop("kept"), **row}


def clip_baseline_coverage(method: str, segment: int | None, objects: int, factor: float, trials: int,
                           frames: int = 32, size: int = 128, regions: int = 16) -> dict:
    """`clip_trials` of DivPrune or CDPruner choosing over the clip, exact (segment None) or in segments."""
    selector = make_method(method, clip_segment=segment)

    def choose(points, keep, frame, g):
        return selector.select(keep, image_tokens=points[None], frames=(frames, 8, size // 8)).keep[0]

    return {"method": method, "segment": segment, **clip_trials(choose, objects, factor, trials, frames, size, regions)}


def clip_main(args) -> None:
    rows = [clip_coverage(w, s, k, c, args.trials) for s in ("fixed", "geometric") for k in (16, 48)
            for c in (1.0, 1.5, 2.0) for w in (None, 4, 8)]
    print(f"| schedule | K | T_div | segment | trials with a missed object | median radius | median ms "
          f"({torch.get_num_threads()} threads) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['objects']} | {r['t_div']} | {'clip' if r['segment'] is None else r['segment']} "
              f"| {r['trials_with_missed_object']}/{r['trials']} | {r['median_radius']:.4f} | {r['median_ms']:.0f} |")
    baselines = [clip_baseline_coverage(m, w, k, c, args.trials) for m in ("divprune", "cdpruner") for k in (16, 48)
                 for c in (1.0, 1.5, 2.0) for w in (None, 8)]
    print(f"\n| method | K | kept | clip_segment | trials with a missed object | median radius | median ms "
          f"({torch.get_num_threads()} threads) |")
    print("|---|---|---|---|---|---|---|")
    for r in baselines:
        print(f"| {r['method']} | {r['objects']} | {r['kept']} | {'clip' if r['segment'] is None else r['segment']} "
              f"| {r['trials_with_missed_object']}/{r['trials']} | {r['median_radius']:.4f} | {r['median_ms']:.0f} |")
    with open(args.out, "w") as f:
        json.dump({"clip_coverage": rows, "baseline_clip_coverage": baselines, "torch": torch.__version__}, f,
                  indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="default benchmarks/results/diversity.json, or "
                                                     "diversity-clip.json with --clip")
    parser.add_argument("--clip", action="store_true", help="coverage of dedup_segment on a 32-frame clip instead")
    args = parser.parse_args()
    if args.clip:
        args.out = args.out or "benchmarks/results/diversity-clip.json"
        return clip_main(args)
    args.out = args.out or "benchmarks/results/diversity.json"
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
