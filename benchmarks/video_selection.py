"""Selection time of every pre-LLM method over a video clip, per frame and per clip, against the LLM prefill
it saves (#27 item 5; docs/diversity.md, "Clip scale").

Signals of a Qwen2.5-VL bench shape (prunevlm/bench/models.py): projected tokens of the LLM's width (small
1024, 7b 3584), saliency, the tower's per-head keys (width 80), 40 text rows, the 28 x 28 pixels under each token,
and each frame's token-to-token attention (never a clip-wide N x N map: per frame VFlowOpt takes its frame's
`attention`, per clip the frames as crops, `crop_attention`). A
clip is t frames of h x w tokens (default 8 x 16 = 128, a 448 px Qwen2.5-VL frame of two video frames
merged counts 256; 128 keeps the issue's 4,096 tokens at 32 frames). Each method keeps `--fraction` of the
tokens:

- per_clip: one call on the clip, the frames as its planes (`planes`, `frames` = (t, h, w)), k = the
  fraction of all tokens;
- per_frame: one call per frame, as the runtime does (each frame its own grid), k = the fraction of a
  frame; EVS, which compares frames, runs once on the whole clip (`select_frames`).

The prefill saved is the small shape's LLM (h1024 x 8 layers, random weights) on text + N tokens minus
text + the kept tokens, timed in the same process; with `--shape 7b` the tokens and text are Qwen2.5-VL-7B's
3,584 wide and the prefill is one of its decoder layers timed and multiplied by its 28 (the layers are
identical; the whole 7B LLM is too slow to time on a CPU). The signals computed in the vision tower (the
attention of the saliency block) are not in these times: `prunevlm bench --video-frames` measures them in
the pipeline ("of which signals"), and they are the same at both shapes (the small tower keeps the 7B
tower's width, heads and tokens per frame). Targets: selection <= 5 % of the prefill saved, and
from 32 to 128 frames at most 8x the time. Every time is the median of the calls after a warm-up call: at
least `--repeats`, and as many more as fit in `--min-seconds` of the loop, so that a sub-millisecond
selection (random, uniform) is the median of hundreds of calls, not of three. With `--cold`, a buffer of
`--evict-mib` is rewritten before every timed call. Without it a 4,096-token clip's signals stay in a 32 MiB
last-level cache from one call to the next while a 16,384-token clip's do not ([1, N, 1024] fp32 tokens are
16 and 64 MiB), and a method that only reads its inputs once (random: the finiteness check's pass over
`image_tokens` is nearly all its time) then shows 8-11x from 32 to 128 frames for 4x the work.

    PYTHONPATH=. python benchmarks/video_selection.py [--frames 32,128] [--threads 2] [--cold] [--shape 7b] \
        [--min-seconds 0.5] [--methods divprune,cdpruner] [--options '{"divprune": {"clip_segment": null}}'] \
        [--out benchmarks/results/video_selection.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from prunevlm.bench.models import qwen2_5_vl_config
from prunevlm.budget import Budget
from prunevlm.methods import METHODS, make_method

PRE_LLM = [name for name, cls in METHODS.items() if not cls.llm_signals]
KEYS, TEXT, PATCH = 80, 40, 28  # Qwen2.5-VL's tower head width (every shape), text tokens, pixels per token


def clip_signals(frames: int, height: int, width: int, llm_width: int, seed: int = 0) -> dict:
    """Random signals of one clip, batch 1, tokens and text `llm_width` wide."""
    g = torch.Generator().manual_seed(seed)
    size = height * width
    tokens = frames * size
    maps = torch.rand(frames, size, size, generator=g).softmax(dim=-1)  # per frame, rows: queries
    return {
        "frame_attention": maps[None],
        # per token, within its frame: the attention it receives from each token, and gives to each
        "crop_attention": torch.stack([maps.transpose(1, 2), maps], dim=2).reshape(1, tokens, 2, size),
        "image_tokens": torch.randn(1, tokens, llm_width, generator=g),
        "saliency": torch.rand(1, tokens, generator=g).pow(8),
        "keys": torch.randn(1, tokens, KEYS, generator=g),
        "text_embeds": torch.randn(1, TEXT, llm_width, generator=g),
        "patches": torch.rand(1, tokens, 3, PATCH, PATCH, generator=g) * 2 - 1,
    }


def per_clip(method, fraction: float, signals: dict, frames: int, height: int, width: int):
    layout = {"planes": ((height, width),) * frames, "frames": (frames, height, width)}
    taken = {k: v for k, v in {**signals, **layout}.items() if k in method.signals + method.optional_signals}
    taken.pop("attention", None)
    return lambda: method(Budget(fraction), **taken)


def per_frame(method, fraction: float, signals: dict, frames: int, height: int, width: int):
    size = height * width
    if method.whole_clip:
        taken = {k: v for k, v in {**signals, "frames": (frames, height, width)}.items() if k in method.signals}
        return lambda: method.select_frames(Budget(fraction), **taken)
    layout = {"grid": (height, width), "planes": ((height, width),), "frames": (1, height, width)}
    parts = []
    for frame in range(frames):
        part = {k: v if k == "text_embeds" else v[:, frame * size:(frame + 1) * size] for k, v in signals.items()
                if k not in ("frame_attention", "crop_attention")}
        part["attention"] = signals["frame_attention"][:, frame]
        parts.append({k: v for k, v in {**part, **layout}.items() if k in method.signals + method.optional_signals})
    return lambda: [method(Budget(fraction), **part) for part in parts]


def median_ms(call, repeats: int, min_seconds: float = 0.0, evict: torch.Tensor | None = None) -> float:
    """Median of the timed calls after a warm-up: at least `repeats`, more until the loop has run
    `min_seconds`; `evict` is read and rewritten before each call, so the call finds its inputs in memory."""
    call()  # warm-up
    times = []
    began = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - began < min_seconds:
        if evict is not None:
            evict.add_(1.0)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def prefill_ms(lengths: list[int], repeats: int, shape: str) -> tuple[dict[int, float], dict]:
    """The LLM forward of `shape` on `length` random input embeddings, per length: the small shape's whole
    LLM; for 7b (Qwen2.5-7B's decoder, too slow to run whole on a CPU) one decoder layer timed and multiplied
    by the layer count, its layers being identical. Returns the times and what was timed."""
    from transformers import Qwen2_5_VLTextModel

    config = qwen2_5_vl_config(shape).text_config
    layers, timed = config.num_hidden_layers, config.num_hidden_layers if shape == "small" else 1
    config.num_hidden_layers = timed
    torch.manual_seed(0)
    model = Qwen2_5_VLTextModel._from_config(config).eval()
    times = {length: median_ms(lambda: model(inputs_embeds=torch.randn(1, length, config.hidden_size)), repeats)
             * layers / timed for length in sorted(set(lengths))}
    return times, {"shape": shape, "width": config.hidden_size, "layers": layers, "layers_timed": timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="32,128", help="comma-separated frame counts")
    parser.add_argument("--grid", default="8,16", help="h,w tokens per frame")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the tokens kept")
    parser.add_argument("--shape", choices=("small", "7b"), default="small",
                        help="Qwen2.5-VL shape of the LLM: the tokens' width and the prefill saved (7b: one "
                             "decoder layer timed, times 28)")
    parser.add_argument("--methods", default=",".join(PRE_LLM), help="comma-separated pre-LLM methods")
    parser.add_argument("--options", default="{}", help='JSON {method: {option: value}}, e.g. \'{"divprune": '
                                                        '{"clip_segment": null}}\' for the exact greedy')
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed calls per row")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="per row, repeat the timed calls until the loop has run this long")
    parser.add_argument("--cold", action="store_true",
                        help="rewrite a buffer larger than the last-level cache before every timed selection")
    parser.add_argument("--evict-mib", type=int, default=256, help="size of that buffer, MiB")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/video_selection.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.frames.split(",")]
    height, width = (int(n) for n in args.grid.split(","))
    options = json.loads(args.options)
    methods = [m for m in args.methods.split(",") if m]
    evict = torch.zeros(args.evict_mib * 2**20 // 4) if args.cold else None
    llm_width = qwen2_5_vl_config(args.shape).text_config.hidden_size
    rows = []
    for frames in counts:
        signals = clip_signals(frames, height, width, llm_width)
        for name in methods:
            method = make_method(name, **options.get(name, {}))
            for scope, build in (("per_frame", per_frame), ("per_clip", per_clip)):
                call = build(method, args.fraction, signals, frames, height, width)
                kept = Budget(args.fraction).tokens_to_keep(height * width) * frames if scope == "per_frame" else \
                    Budget(args.fraction).tokens_to_keep(frames * height * width)
                ms = median_ms(call, args.repeats, args.min_seconds, evict)
                rows.append({"frames": frames, "tokens": frames * height * width, "method": name, "scope": scope,
                             "kept": kept, "selection_ms": ms})
                print(f"{frames} frames, {name}, {scope}: {ms:.2f} ms", file=sys.stderr)
    prefill, llm = prefill_ms([r["tokens"] + TEXT for r in rows] + [r["kept"] + TEXT for r in rows], args.repeats,
                              args.shape)
    first = {(r["method"], r["scope"]): r["selection_ms"] for r in rows if r["frames"] == counts[0]}
    print(f"\n{torch.get_num_threads()} threads, {args.shape} shape ({llm['width']}-wide tokens, prefill of "
          f"{llm['layers']} LLM layers{' scaled from ' + str(llm['layers_timed']) if llm['layers_timed'] < llm['layers'] else ''}), "
          f"{height} x {width} tokens per frame, {args.fraction:.0%} kept, "
          f"selection {'cold (cache evicted before each call)' if args.cold else 'warm'}\n")
    print("| frames | tokens | method | scope | kept | selection ms | prefill saved ms | selection / saved "
          f"| time vs {counts[0]} frames |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["prefill_saved_ms"] = prefill[r["tokens"] + TEXT] - prefill[r["kept"] + TEXT]
        r["share_of_saved"] = r["selection_ms"] / r["prefill_saved_ms"]
        r["growth"] = r["selection_ms"] / first[(r["method"], r["scope"])]
        print(f"| {r['frames']} | {r['tokens']} | {r['method']} | {r['scope']} | {r['kept']} | {r['selection_ms']:.2f} "
              f"| {r['prefill_saved_ms']:.0f} | {100 * r['share_of_saved']:.1f} % | {r['growth']:.2f}x |")
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "shape": args.shape, "llm": llm, "grid": [height, width],
                   "fraction": args.fraction,
                   "options": options, "repeats": args.repeats, "min_seconds": args.min_seconds,
                   "cold": args.cold, "evict_mib": args.evict_mib if args.cold else None,
                   "prefill_ms": prefill, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
