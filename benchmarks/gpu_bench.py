"""The GPU benchmark (issue #18), run by benchmarks/gpu.sh: TTFT, LLM prefill, selection and decode of the
LLaVA-1.5-7B and Qwen2.5-VL-7B shapes with random bf16 weights, at batch 1 and 16, for each method and
budget; selection alone per image at batch 1 and 16; one JSON and one markdown file.

Every figure is a median over `--repeats` rounds after a warm-up round (prunevlm.bench.timing.measure:
each round runs every configuration once). `--shape tiny` runs the same code on tiny widths (a dry run,
e.g. on a CPU). The targets of issue #18 are checked in the markdown: TTFT at 64 of 576 tokens at least
3.5x faster than unpruned at batch 16 (7B LLaVA shape), and selection at most 2 % of the pruned prefill at
batch 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from prunevlm.bench.models import build_model, build_qwen, prompt_inputs, qwen_prompt_inputs, selection_signals
from prunevlm.bench.report import device_name, selection_table, table
from prunevlm.bench.timing import measure, selection_per_image
from prunevlm.models import get_adapter

METHODS = ("flashvlm", "vispruner", "vflowopt", "random")
BUDGETS = (576, 192, 128, 64, 32)


def family_run(family: str, shape: str, args, device, dtype, result: dict, save) -> None:
    """Measure one family into `result`, calling `save()` after each batch size (a run cut short by its
    time limit keeps what it measured)."""
    started = time.perf_counter()
    if family == "llava":
        model = build_model(shape, dtype, device, args.attn)
    else:
        model = build_qwen(shape, dtype, device, args.attn)
    configs = [("none", None)] + [(m, b) for m in METHODS for b in BUDGETS]
    result.update(family=family, shape=shape, batches={})
    for batch in args.batches:
        if family == "llava":
            inputs = prompt_inputs(model, args.text_tokens, device, batch=batch)
        else:
            inputs = qwen_prompt_inputs(model, args.text_tokens, device, batch=batch, side=args.qwen_side)
        print(f"[{time.perf_counter() - started:6.1f} s] {family} {shape} batch {batch}: {len(configs)} configurations",
              file=sys.stderr, flush=True)
        result["batches"][batch] = measure(model, inputs, configs, args.repeats, args.decode_tokens)
        save()
    if family == "llava":  # selection alone, on signals of this shape (the LLaVA adapter's signals)
        signals = {name: value if name == "grid" else
                   value.to(device, dtype if name in ("image_tokens", "features", "text_embeds", "patches") else torch.float32)
                   for name, value in selection_signals(shape, max(args.batches), args.text_tokens).items()}
        result["selection_per_image"] = selection_per_image(signals, list(METHODS), list(BUDGETS), tuple(args.batches),
                                                            args.repeats, get_adapter(model).num_layers)
    result["seconds"] = time.perf_counter() - started
    save()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def targets(result: dict, batches: list[int]) -> list[str]:
    """The issue's targets, read off the LLaVA rows."""
    lines = []
    large, small = batches[-1], batches[0]
    rows = {(r["method"], r["budget"]): r for r in result["batches"][large]}
    base = rows[("none", None)]
    for method in METHODS:
        speedup = base["ttft_ms"] / rows[(method, 64)]["ttft_ms"]
        lines.append(f"- TTFT at 64 of 576 tokens, batch {large}, {method}: {speedup:.2f}x faster than unpruned "
                     f"(target >= 3.5x: {'met' if speedup >= 3.5 else 'not met'})")
    rows = {(r["method"], r["budget"]): r for r in result["batches"][small]}
    for method in METHODS:
        r = rows[(method, 64)]
        share = 100 * r["selection_ms"] / r["prefill_ms"]
        lines.append(f"- selection / pruned prefill at 64 tokens, batch {small}, {method}: {share:.1f} % "
                     f"(target <= 2 %: {'met' if share <= 2 else 'not met'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--families", default="llava,qwen2_5_vl")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--qwen-side", type=int, default=48, help="Qwen image side in patches (48: 576 tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON; the markdown beside it (.md)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"command": " ".join(["python benchmarks/gpu_bench.py", *sys.argv[1:]]), "device": device_name(device),
              "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "repeats": args.repeats,
              "decode_tokens": args.decode_tokens, "text_tokens": args.text_tokens, "results": []}

    def save():
        markdown = summary(report, args.batches)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown)
        return markdown

    for family in args.families.split(","):
        report["results"].append({})
        family_run(family, args.shape, args, device, dtype, report["results"][-1], save)
    print(save())


def summary(report: dict, batches: list[int]) -> str:
    lines = [f"`{report['command']}` on {report['device']}, {report['dtype']}, torch {report['torch']}, transformers "
             f"{report['transformers']}; median of {report['repeats']} rounds after a warm-up round; times in ms "
             f"(selection_ms: the signal hooks, the whole LLM-input hook and the in-LLM stages' choice, for the batch; peak MB not measured)."]
    for result in report["results"]:
        for batch, rows in result.get("batches", {}).items():
            rows = [dict(row, peak_mb=float("nan")) for row in rows]
            lines += ["", f"### {result['family']} ({result['shape']} shape), batch {batch}", "", table(rows)]
        if "selection_per_image" in result:
            lines += ["", f"### {result['family']} ({result['shape']}): selection alone, ms per image", "",
                      selection_table(result["selection_per_image"], batches)]
            if all(b in result["batches"] for b in batches):
                lines += ["", "Targets (issue #18):", "", *targets(result, batches)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
