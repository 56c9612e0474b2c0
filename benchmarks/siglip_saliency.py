"""The cost of LLaVA-OneVision's saliency at SigLIP-so400m/384 size: the attention each token receives at the
feature layer (729 tokens, 16 heads, width 1152), for one crop and for a 768 x 768 image's 5 crops.

Random weights (the cost does not depend on them) and the adapter's own code path: a OneVision model with an
so400m-shaped tower of one layer (the feature layer; earlier layers do not change the cost) encodes the image
with the adapter's hooks installed; the layer's query and key projections that the hook receives are kept,
and `LlavaOnevisionAdapter.attention_signals` is timed on them (first crop, all crops), alternating in one
run with the formula it replaced, the head-averaged map's column mean (`attention_probs(...).mean(dim=1)`,
which forms every head's N x N map and their average). Medians and minima over `--repeats` rounds after a
warm-up; the ratio before / after as the median of each round's ratio (the two run back to back, so a slow
spell of a shared machine hits both) and as the ratio of the minima; and the largest difference between
the two results. The whole hook in
the pipeline (`capture.seconds`, what `handle.stats.signal_ms` reports) is timed once per round too.

    python benchmarks/siglip_saliency.py [--threads 2] [--repeats 15] [--out siglip_saliency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

from prunevlm.bench.models import FAMILY_IMAGE, SIGLIP_SO400M_384, family_config
from prunevlm.models import get_adapter
from prunevlm.models.base import Capture
from prunevlm.signals.attention import attention_probs


def head_averaged_map_mean(attn, queries, keys) -> torch.Tensor:
    """The saliency as the adapter computed it before: every head's map, averaged, then the column mean."""
    batch, length, _ = keys.shape
    queries = queries.reshape(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = keys.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    return attention_probs(queries, keys, attn.scale).mean(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = family_config("onevision", "tiny")  # tiny LLM: only the tower runs
    config.vision_config = SiglipVisionConfig(**dict(SIGLIP_SO400M_384, num_hidden_layers=1))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(config).eval()
    adapter = get_adapter(model)
    sizes = torch.tensor([FAMILY_IMAGE["onevision"]])
    (crops,) = adapter.crops(sizes)
    side = config.vision_config.image_size
    pixels = torch.randn(1, crops, 3, side, side, generator=torch.Generator().manual_seed(0))

    attn = model.model.vision_tower.encoder.layers[adapter.feature_layer].self_attn
    kept = {}
    capture = Capture()
    handles = adapter.install({"saliency"}, capture)
    handles.append(attn.q_proj.register_forward_hook(lambda m, a, out: kept.__setitem__("q", out)))
    handles.append(attn.k_proj.register_forward_hook(lambda m, a, out: kept.__setitem__("k", out)))

    def pipeline() -> float:
        capture.clear()
        with torch.no_grad():
            model.model.get_image_features(pixels, sizes)
        return capture.seconds

    pipeline()
    queries, keys = kept["q"], kept["k"]
    cases = {f"{n} crop{'s' if n > 1 else ''}": n for n in (1, crops)}
    impls = {"before (head-averaged map, column mean)": lambda q, k: head_averaged_map_mean(attn, q, k),
             "after (adapter: blockwise column sums)": lambda q, k: adapter.attention_signals(attn, q, k, {"saliency"})["saliency"]}
    times = {(case, impl): [] for case in cases for impl in impls}
    times.update({("pipeline hook, all crops", "after"): []})
    difference = {}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):
            for case, n in cases.items():
                results = []
                for impl, run in impls.items():
                    start = time.perf_counter()
                    results.append(run(queries[:n], keys[:n]))
                    if round_:
                        times[(case, impl)].append(time.perf_counter() - start)
                difference[case] = float((results[0] - results[1]).abs().max())
            seconds = pipeline()
            if round_:
                times[("pipeline hook, all crops", "after")].append(seconds)
    for handle in handles:
        handle.remove()

    report = {"threads": args.threads, "repeats": args.repeats, "tokens": int(keys.shape[1]),
              "width": int(keys.shape[2]), "heads": attn.num_heads, "crops": crops, "torch": torch.__version__,
              "ms": {f"{case} / {impl}": {"median": 1000 * statistics.median(v), "min": 1000 * min(v)}
                     for (case, impl), v in times.items()},
              "max_abs_difference": difference}
    before, after = impls
    report["before_over_after"] = {case: {
        "median_of_round_ratios": statistics.median(b / a for b, a in zip(times[(case, before)], times[(case, after)])),
        "ratio_of_minima": min(times[(case, before)]) / min(times[(case, after)])} for case in cases}
    for name, figures in report["ms"].items():
        print(f"{name:70s} median {figures['median']:8.2f} ms   min {figures['min']:8.2f} ms")
    for case in cases:
        ratio = report["before_over_after"][case]
        print(f"{case}: before / after = {ratio['median_of_round_ratios']:.2f}x (median of round ratios), "
              f"{ratio['ratio_of_minima']:.2f}x (minima); largest difference {difference[case]:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
