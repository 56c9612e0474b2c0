"""`prunevlm eval`: accuracy against budget for every method on the demo's held-out splits (the test split and
the crowded scenes), per question type, with the fidelity VFlowOpt optimises (mean cosine between pruned and
unpruned last-token final hidden states) and the KV cache each configuration keeps, then FlashVLM against the
text-blind selections of ``PAIRS`` on the same questions (``paired.paired_difference``). Writes JSON, markdown
tables and a PNG plot."""

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
from .paired import LEVEL, paired_difference

# FlashVLM against the methods that share its diversity step without the text (VisPruner) or select for
# diversity alone (DivPrune): the paired comparison docs/evaluation.md reports.
PAIRS = (("flashvlm", "vispruner"), ("flashvlm", "divprune"))

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
        correct = "".join("1" if hit else "0" for hit in accuracy.right(items, answers))
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
        "correct": correct,
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


def comparisons(split: str, rows: list[dict], items: list, groups: list[int], qtypes: list[str]) -> list[dict]:
    """For each pair in ``PAIRS`` and each budget both methods ran at: the paired accuracy difference, overall
    and per question type."""
    by_key = {(r["name"], r["budget"]): r for r in rows}
    out = []
    for first, second in PAIRS:
        for budget in [r["budget"] for r in rows if r["name"] == first]:
            if (second, budget) not in by_key:
                continue
            a, b = (by_key[(name, budget)]["correct"] for name in (first, second))
            for qtype in ["overall", *qtypes]:
                pick = [i for i, it in enumerate(items) if qtype == "overall" or it.qtype == qtype]
                result = paired_difference([int(a[i]) for i in pick], [int(b[i]) for i in pick], [groups[i] for i in pick])
                out.append({"split": split, "method": first, "against": second, "budget": budget, "qtype": qtype,
                            **result})
    return out


def comparison_table(found: list[dict]) -> str:
    """One table per pair: a row per (split, question type), a column per budget, each cell the difference
    in accuracy points with its interval."""
    tables = []
    for first, second in PAIRS:
        cells = [c for c in found if (c["method"], c["against"]) == (first, second)]
        if not cells:
            continue
        budgets = list(dict.fromkeys(c["budget"] for c in cells))
        lines = [f"{first} minus {second}, accuracy points, [{100 * LEVEL:.0f} % interval] (paired, images resampled)",
                 "", "| split | question type | " + " | ".join(f"{b} tokens" for b in budgets) + " |",
                 "|" + "---|" * (2 + len(budgets))]
        for split, qtype in dict.fromkeys((c["split"], c["qtype"]) for c in cells):
            row = {c["budget"]: c for c in cells if (c["split"], c["qtype"]) == (split, qtype)}
            lines.append(f"| {split} | {qtype} | " + " | ".join(
                f"{100 * row[b]['difference']:+.1f} [{100 * row[b]['low']:+.1f}, {100 * row[b]['high']:+.1f}]"
                if b in row else "-" for b in budgets) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(splits: dict[str, dict], path: str) -> None:
    """Accuracy and fidelity against kept tokens, one row of two panels per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(splits), 2, figsize=(11, 4.2 * len(splits)), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for (left, right), result in zip(axes, splits.values()):
        rows = result["rows"]
        names = list(dict.fromkeys(r["name"] for r in rows[1:]))
        for index, name in enumerate(names):
            points = sorted((r["layer_average_tokens"], r["accuracy"]["overall"], r["fidelity"]) for r in rows
                            if r["name"] == name)
            in_llm = next(r["in_llm"] for r in rows if r["name"] == name)
            style = dict(marker="s" if in_llm else "o", ls="--" if in_llm else "-", color=colours[index % len(colours)])
            left.plot([p[0] for p in points], [100 * p[1] for p in points], label=name, **style)
            right.plot([p[0] for p in points], [p[2] for p in points], label=name, **style)
        left.axhline(100 * rows[0]["accuracy"]["overall"], color="k", lw=0.8, ls=":", label="unpruned")
        for axis, label in ((left, "accuracy (%)"), (right, "fidelity: mean cos(last-token states)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("visual tokens per image (layer average for in-LLM methods, dashed)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        left.set_title(result["title"], fontsize=9, loc="left")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_split(model, processor, split: str, args) -> dict:
    """Every configuration on the first ``args.images`` images of ``split``, and FlashVLM's paired comparisons."""
    samples = dataset.generate(split, args.images)
    items = dataset.flatten(samples)
    groups = [index for index, sample in enumerate(samples) for _ in sample.questions]
    qtypes = list(dataset.CROWDED_QTYPES if split in dataset.CROWDED_SPLITS else dataset.QTYPES)
    rows, refused, reference = [], [], None
    print(f"{split}: {len(items)} questions", file=sys.stderr)
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
    title = (f"demo {split} split, {len(items)} questions, {rows[0]['kept_tokens']} visual tokens per image "
             f"(unpruned {100 * rows[0]['accuracy']['overall']:.1f} %)")
    markdown = table(rows, qtypes) + "".join(
        f"\n\n{r['name']} at {r['budget']} refused: {r['reason']}" for r in refused)
    return {"title": title, "questions": len(items), "images": len(samples), "rows": rows, "refused": refused,
            "majority_baseline": dataset.majority_baseline(items), "markdown": markdown,
            "comparisons": comparisons(split, rows, items, groups, qtypes)}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = accuracy.load(args.model, args.dtype, args.device)
    splits = {split: evaluate_split(model, processor, split, args) for split in args.split}
    found = [c for result in splits.values() for c in result.pop("comparisons")]
    markdown = "\n\n".join(f"{r['title']}\n\n{r.pop('markdown')}" for r in splits.values())
    if found:
        markdown += "\n\n" + comparison_table(found)
    print(f"\n{markdown}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"splits": splits, "comparisons": found, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    with open(f"{args.out}.md", "w") as f:
        f.write(markdown + "\n")
    plot(splits, f"{args.out}.png")
    print(f"\nwrote {args.out}.json, {args.out}.md, {args.out}.png", file=sys.stderr)
    return result
