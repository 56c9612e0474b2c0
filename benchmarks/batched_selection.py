"""One batch of 16 images against 16 single-image selections, on LLaVA-1.5-shaped signals (issue #18).

The signals are random with the shapes the LLaVA adapter gives at LLaVA-1.5-7B: N = 576 image tokens of
the LLM's width (4096), CLIP features before the projector (1024) for the diversity partition, a saliency
that sums to one, and 40 prompt tokens. The same method instance selects the 16 images once as one batch
and once image by image; rounds alternate the two orders, so a slow spell of a shared machine falls on
both. The kept indices (and the important/diverse split) must be identical. Also times the parts of one
batched call, to say where the time goes.

    python benchmarks/batched_selection.py [--method flashvlm] [--images 16] [--budget 64] [--repeats 7]
        [--threads 1] [--schedule fixed|geometric] [--out benchmarks/results/batched_selection.md]

The cost of computing the order-deciding similarities in fp64 (issue #25, docs/diversity.md "Same result on
every CPU"): one image at N = 576 and at N = 4,608 (8 frames, the neighbour-list path of the partition) per
method, and the batch of 16 at N = 576, each run on the commit before and the one after, on the same quiet
machine (the script reads only names both have):

    for m in flashvlm vispruner divprune cdpruner; do
        python benchmarks/batched_selection.py --method $m --images 1 --tokens 576 --budget 64 --repeats 15
        python benchmarks/batched_selection.py --method $m --images 1 --tokens 4608 --budget 512 --repeats 7
    done
    python benchmarks/batched_selection.py --method flashvlm --images 16 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import prunevlm
from prunevlm.methods import METHODS, diversity, flashvlm


def llava_signals(images: int, tokens: int, width: int, feature_width: int, text: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = round(tokens**0.5)
    return {
        "image_tokens": torch.randn(images, tokens, width, generator=g),
        "features": torch.randn(images, tokens, feature_width, generator=g),
        "saliency": torch.rand(images, tokens, generator=g).pow(8).softmax(dim=-1),
        "text_embeds": torch.randn(images, text, width, generator=g),
        "attention": torch.rand(images, tokens, tokens, generator=g).softmax(dim=-1),
        "patches": torch.randn(images, tokens, 3, 14, 14, generator=g),
        "grid": (side, side),
    }


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return 1000 * (time.perf_counter() - start), result


def parts_of_one_call(method, budget, signals, repeats: int) -> dict[str, float]:
    """Median ms of the main parts inside one batched call (flashvlm/vispruner), by wrapping them."""
    times: dict[str, list[float]] = {}
    wrapped = [(flashvlm.FlashVLM, "text_score", "text relevance + sharpening"),
               (diversity, "symmetric_gram", "Gram matrix of the residual"),
               (diversity, "dense_rounds", "diversity rounds")]
    originals = []
    for owner, name, label in wrapped:
        inner = getattr(owner, name)
        originals.append((owner, name, inner))

        def wrapper(*args, inner=inner, label=label, **kwargs):
            ms, result = timed(lambda: inner(*args, **kwargs))
            times.setdefault(label, []).append(ms)
            return result

        setattr(owner, name, wrapper)
    try:
        total = [timed(lambda: method(budget, **signals))[0] for _ in range(repeats)]
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    parts = {label: statistics.median(values) for label, values in times.items()}
    parts["whole call"] = statistics.median(total)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="flashvlm", choices=sorted(METHODS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--width", type=int, default=4096, help="LLM width of the image tokens (LLaVA-1.5-7B)")
    parser.add_argument("--feature-width", type=int, default=1024, help="CLIP ViT-L width of the features")
    parser.add_argument("--text", type=int, default=40, help="prompt tokens per image")
    parser.add_argument("--schedule", choices=("fixed", "geometric"), default="fixed",
                        help="the diversity partition's dedup_schedule (flashvlm, vispruner)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="markdown file for the result")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"dedup_schedule": args.schedule} if "dedup_schedule" in METHODS[args.method].options() else {}
    method = METHODS[args.method](**options)
    signals = llava_signals(args.images, args.tokens, args.width, args.feature_width, args.text)
    signals = {name: value for name, value in signals.items() if name in method.signals + method.optional_signals}
    budget = prunevlm.Budget(args.budget)

    def singles():
        return [method(budget, **{n: v if n == "grid" else v[i : i + 1] for n, v in signals.items()})
                for i in range(args.images)]

    def batch():
        return method(budget, **signals)

    with torch.inference_mode():
        batch(), singles()  # warm-up
        batch_ms, singles_ms = [], []
        for round_ in range(args.repeats):
            order = (("batch", batch), ("singles", singles)) if round_ % 2 == 0 else (("singles", singles), ("batch", batch))
            for name, function in order:
                ms, result = timed(function)
                if name == "batch":
                    batch_ms.append(ms)
                    batched = result
                else:
                    singles_ms.append(ms)
                    alone = result
            for i, selection in enumerate(alone):
                assert torch.equal(batched.keep[i], selection.keep[0]), f"image {i}: batch and single differ"
                for key, value in batched.info.items():
                    assert torch.equal(value[i], selection.info[key][0]), f"image {i}: {key} differs"
        parts = parts_of_one_call(method, budget, signals, args.repeats) if args.method in ("flashvlm", "vispruner") else {}
    batch_median, singles_median = statistics.median(batch_ms), statistics.median(singles_ms)
    command = " ".join(["python benchmarks/batched_selection.py", *sys.argv[1:]])
    lines = [
        f"`{command}`: {args.method}, {args.images} images of N = {args.tokens} tokens (width {args.width}, "
        f"features {args.feature_width}, {args.text} text tokens), k = {args.budget}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {args.repeats} rounds after a warm-up, the two orders alternating.",
        "",
        "| selection | total ms | ms per image |",
        "|---|---|---|",
        f"| {args.images} single-image calls | {singles_median:.1f} | {singles_median / args.images:.2f} |",
        f"| one batch of {args.images} | {batch_median:.1f} | {batch_median / args.images:.2f} |",
        "",
        f"batch / singles = {batch_median / singles_median:.2f} (every round: "
        + ", ".join(f"{b / s:.2f}" for b, s in zip(batch_ms, singles_ms)) + "); kept indices identical in every round.",
    ]
    if parts:
        lines += ["", f"Inside one batched call (median ms, the {args.images} images together):", "",
                  "| part | ms | share |", "|---|---|---|"]
        lines += [f"| {label} | {ms:.1f} | {100 * ms / parts['whole call']:.0f} % |" for label, ms in parts.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
