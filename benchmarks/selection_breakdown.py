"""Where a method's selection time goes, measured inside the pipeline on the bench's small CPU model.

Runs `generate(max_new_tokens=1)` repeatedly with the method attached and times its parts with wrappers
around the functions that do them (the wrappers cost a few microseconds each, so the parts add up to a
little more than an unwrapped run). Prints the median of each part, the median `selection_ms` the handle
reports, the median LLM prefill and their ratio.

    python benchmarks/selection_breakdown.py [--method flashvlm] [--budget 32] [--runs 30] [--threads 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

import torch

import prunevlm
from prunevlm.bench.timing import Stopwatch
from prunevlm.bench.models import build_model, prompt_inputs
from prunevlm.methods import base, diversity, flashvlm
from prunevlm.models.base import Capture
from prunevlm.runtime.llm_input import InputPruning

PARTITION, GRAM, ROUND = "diversity partition, whole", "Gram matrix of the residual", \
    "rounds: column-wise max over B (all rounds; NumPy per image on the CPU)"
REMAINDER = "partition remainder (ordering, gathers)"
# (owner, attribute, depth, label): the parts, outermost first
PARTS = [
    (InputPruning, "_prune_prefill", 0, "LLM-input hook, whole"),
    (Capture, "match", 1, "matching recorded signals to the images"),
    (InputPruning, "_choose", 1, "method on the images, whole"),
    (base.Method, "check_signals", 2, "signal checks"),
    (flashvlm.FlashVLM, "text_score", 2, "text relevance + sharpening"),
    (flashvlm, "fuse", 2, "log-domain fusion"),
    (diversity, "bipartite_dedup", 2, PARTITION),
    (diversity, "symmetric_gram", 3, GRAM),
    (diversity, "dense_rounds", 3, ROUND),
]


def wrap(owner, name: str, label: str, times: dict) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        times[label].append(time.perf_counter() - start)
        return result

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="flashvlm")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--runs", type=int, default=30, help="timed generate calls, after 5 untimed ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="prompts of one image each, selected as one batch")
    parser.add_argument("--out", default=None, help="optional JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("small", torch.float32, torch.device("cpu"))
    inputs = prompt_inputs(model, 40, torch.device("cpu"), batch=args.batch)
    times: dict[str, list[float]] = defaultdict(list)
    for owner, name, _, label in PARTS:
        wrap(owner, name, label, times)
    selection, signals = [], []
    watch = Stopwatch(model)
    with prunevlm.prune(model, args.method, args.budget) as handle, torch.inference_mode():
        for run in range(5 + args.runs):
            if run == 5:
                times.clear()
                watch.prefill.clear()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            if run >= 5:
                selection.append(handle.stats.selection_ms)
                signals.append(handle.stats.signal_ms)
    watch.remove()
    prefill = 1000 * statistics.median(watch.prefill)
    parts = {label: 1000 * statistics.median(values) for label, values in times.items() if values}
    if PARTITION in parts:
        parts[REMAINDER] = parts[PARTITION] - parts[GRAM] - parts[ROUND]
    report = {"command": " ".join(["python benchmarks/selection_breakdown.py", *sys.argv[1:]]),
              "method": args.method, "budget": args.budget, "runs": args.runs, "threads": args.threads, "batch": args.batch,
              "selection_ms": statistics.median(selection), "signal_hooks_ms": statistics.median(signals),
              "prefill_ms": prefill, "parts_ms": parts}
    print(f"{args.method} at {args.budget} tokens, batch {args.batch}, median of {args.runs} calls ({args.threads} threads):")
    rows = [(0, "signal hooks in the vision tower", report["signal_hooks_ms"])]
    rows += [(depth, label, parts[label]) for _, _, depth, label in PARTS if label in parts]
    if REMAINDER in parts:
        rows.append((4, REMAINDER, parts[REMAINDER]))
    for depth, label, ms in rows:
        print(f"  {'  ' * depth + label:56s}{ms:7.3f} ms")
    print(f"selection_ms reported {report['selection_ms']:.2f} ms; LLM prefill {prefill:.1f} ms; "
          f"ratio {100 * report['selection_ms'] / prefill:.1f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
