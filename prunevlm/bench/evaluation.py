"""`prunevlm eval`: accuracy against budget for every method on the demo test split, per question type, with
the fidelity VFlowOpt optimises (mean cosine between pruned and unpruned last-token final hidden states)
and the KV cache each configuration keeps. Writes JSON, a markdown table and a PNG plot."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from .. import prune
from ..api import resolve
from ..calibrate.flow import flow_similarity
from ..demo import accuracy, dataset
from ..errors import InvalidConfig
from ..loading import prompt_inputs, with_processor_normalisation
from ..methods.base import Refused
from ..models import get_adapter
from ..runtime.contract import output_cache
from .memory import kv_bytes

def configurations(args) -> list[dict]:
    """Every (method, budget, options) to evaluate, the unpruned model first. Each calibrated VFlowOpt config
    (`args.vflowopt`: configs loaded by the CLI) is followed by VFlowOpt's defaults at its budget and layers."""
    configs = [{"name": "unpruned", "method": None, "budget": None, "options": {}}]
    budgets = [budget.value for budget in args.budgets]  # plain numbers for the JSON rows
    for method in args.methods:
        configs += [{"name": method, "method": method, "budget": b, "options": {}} for b in budgets]
    for config in args.vflowopt:
        if config["method"] != "vflowopt":
            raise InvalidConfig(f"--vflowopt {config['path']} is a {config['method']!r} config, not a vflowopt one")
        configs.append({"name": "vflowopt (calibrated)", "method": "vflowopt", "budget": config["budget"].value,
                        "options": config["options"], "config": os.path.basename(config["path"])})
        layers = config["options"].get("layers")
        default = {"layers": layers} if layers else {}
        configs.append({"name": "vflowopt (default)", "method": "vflowopt", "budget": config["budget"].value, "options": default})
    return configs


@torch.inference_mode()
def measure(model, processor, items, config: dict, reference: torch.Tensor | None, args) -> dict:
    """Accuracy, fidelity, kept tokens and KV cache of one configuration."""
    handle = None
    if config["method"] is not None:  # the processor's pixel normalisation where the options do not set it
        method, budget, _, _ = resolve(config["method"], config["budget"], None, config["options"])
        handle = prune(model, with_processor_normalisation(method, processor, config["options"]), budget)
    try:
        start = time.perf_counter()
        answers, states = accuracy.predict(model, processor, items, args.batch_size, return_states=True)
        seconds = time.perf_counter() - start
        result = accuracy.score(items, answers)
        kept, layer_average, cache = [], [], []
        for item in items[: args.kv_samples]:
            inputs = prompt_inputs(processor, [item.image], [item.question], model.device)
            cache.append(kv_bytes(output_cache(model(**inputs, use_cache=True))))
            if handle:
                kept.append(handle.stats.tokens_after[0][0])
                layer_average.append(handle.stats.layer_average[0][0])
            else:
                kept += get_adapter(model).image_token_counts(inputs)
                layer_average.append(kept[-1])
    finally:
        if handle:
            handle.remove()
    fidelity = None if reference is None else float(flow_similarity(reference, states).mean())
    return {
        **{k: config[k] for k in ("name", "method", "budget")},
        "in_llm": handle is not None and handle.method.prunes_in_llm,
        "kept_tokens": statistics.mean(kept),
        "layer_average_tokens": statistics.mean(layer_average),
        "accuracy": {k: v for k, v in result.items() if k != "n"},
        "questions": result["n"],
        "fidelity": fidelity,
        "kv_bytes": statistics.mean(cache),
        "seconds": seconds,
        "states": states,
    }


def table(rows: list[dict], qtypes: list[str]) -> str:
    base_kv = rows[0]["kv_bytes"]
    header = ["method", "budget", "visual tokens (layer avg)", "overall", *qtypes, "fidelity", "KV cache"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        tokens = f"{r['kept_tokens']:.0f}" + (f" ({r['layer_average_tokens']:.1f})" if r["in_llm"] else "")
        budget = "-" if r["budget"] is None else (f"T={r['budget']:g}" if isinstance(r["budget"], float) else str(r["budget"]))
        cells = [r["name"], budget, tokens, f"{100 * r['accuracy']['overall']:.1f}",
                 *(f"{100 * r['accuracy'][q]:.1f}" for q in qtypes),
                 "1" if r["fidelity"] is None else f"{r['fidelity']:.4f}", f"{100 * r['kv_bytes'] / base_kv:.0f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    names = []
    for r in rows[1:]:
        if r["name"] not in names:
            names.append(r["name"])
    colours = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        points = sorted((r["layer_average_tokens"], r["accuracy"]["overall"], r["fidelity"]) for r in rows if r["name"] == name)
        x = [p[0] for p in points]
        in_llm = next(r["in_llm"] for r in rows if r["name"] == name)
        style = dict(marker="s" if in_llm else "o", ls="--" if in_llm else "-", color=colours[index % len(colours)])
        left.plot(x, [100 * p[1] for p in points], label=name, **style)
        right.plot(x, [p[2] for p in points], label=name, **style)
    left.axhline(100 * base["accuracy"]["overall"], color="k", lw=0.8, ls=":", label="unpruned")
    for axis, label in ((left, "test accuracy (%)"), (right, "fidelity: mean cos(last-token states)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("visual tokens per image (layer average for in-LLM methods, dashed)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = accuracy.load(args.model, args.dtype, args.device)
    items = dataset.flatten(dataset.generate("test", args.images))
    qtypes = list(dataset.QTYPES)
    rows, refused, reference = [], [], None
    for config in configurations(args):
        try:
            row = measure(model, processor, items, config, reference, args)
        except Refused as error:  # a budget the method cannot reach on this model: say so, go on
            refused.append({**{k: config[k] for k in ("name", "method", "budget")}, "reason": str(error)})
            print(f"  {config['name']:22s} {config['budget']!s:>5s}: refused: {error}", file=sys.stderr)
            continue
        if reference is None:
            reference = row["states"]
        rows.append(row)
        budget = "" if row["budget"] is None else row["budget"]  # the unpruned model has none
        print(f"  {row['name']:22s} {budget!s:>5s}: accuracy {100 * row['accuracy']['overall']:.1f} %, "
              f"fidelity {row['fidelity'] or 1:.4f}, {row['seconds']:.0f} s", file=sys.stderr)
    for row in rows:
        del row["states"]
    title = (f"demo test split, {len(items)} questions, {rows[0]['kept_tokens']} visual tokens per image "
             f"(unpruned {100 * rows[0]['accuracy']['overall']:.1f} %)")
    markdown = table(rows, qtypes) + "".join(
        f"\n\n{r['name']} at {r['budget']} refused: {r['reason']}" for r in refused)
    print(f"\n{title}\n\n{markdown}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(f"{args.out}.json", "w") as f:
        json.dump({"title": title, "questions": len(items), "rows": rows, "refused": refused,
                   "majority_baseline": dataset.majority_baseline(items),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=1)
    with open(f"{args.out}.md", "w") as f:
        f.write(f"{title}\n\n{markdown}\n")
    plot(rows, f"{args.out}.png", title)
    print(f"\nwrote {args.out}.json, {args.out}.md, {args.out}.png", file=sys.stderr)
    return rows
