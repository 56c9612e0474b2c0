"""`prunevlm demo`: the bundled model answers test questions and questions about crowded scenes, unpruned and
pruned, side by side, and a PNG shows which visual tokens each method kept."""

from __future__ import annotations

import os
import sys
import time

import torch

from .. import prune
from ..errors import InvalidSetting
from ..loading import pixel_normalisation, prompt_inputs
from ..models import get_adapter
from ..viz import draw_tokens, model_view, panel
from . import accuracy, dataset

METHODS = ("flashvlm", "vispruner")
BUDGETS = (64, 32, 16, 8)


def pick_items(count: int, split: str = "test") -> list[dataset.Item]:
    """`count` questions of ``split`` from different images, cycling through the question types."""
    items = []
    for index in range(count):
        sample = dataset.render(split, index)
        question = sample.questions[index % len(sample.questions)]
        items.append(dataset.Item(sample.image, question.text, question.answer, question.qtype))
    return items


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    items = pick_items(args.questions) + pick_items(args.crowded, "crowded")
    if not items:
        raise InvalidSetting("nothing to show: give --questions or --crowded above 0")
    model, processor = accuracy.load(args.model, args.dtype, args.device)
    truth = [dataset.normalize(item.answer) for item in items]
    columns = {"unpruned": (accuracy.predict(model, processor, items, batch_size=len(items)), None)}
    for method in METHODS:
        for budget in BUDGETS:
            with prune(model, method, budget) as handle:
                answers = accuracy.predict(model, processor, items, batch_size=len(items))
            columns[f"{method} {budget}"] = (answers, handle.stats)
    inputs = prompt_inputs(processor, [item.image for item in items], [item.question for item in items], model.device)
    grids = get_adapter(model).image_grids(inputs)
    tokens = grids[0][0] * grids[0][1]  # every demo image has the same size

    width = max(len(item.question) for item in items)
    names = list(columns)
    print(f"{'question':{width}s}  {'truth':7s} " + " ".join(f"{name:>12s}" for name in names))
    for row, item in enumerate(items):
        cells = [columns[name][0][row] + ("" if columns[name][0][row] == truth[row] else "*") for name in names]
        print(f"{item.question:{width}s}  {truth[row]:7s} " + " ".join(f"{c:>12s}" for c in cells))
    print(f"\nvisual tokens per image: {tokens} unpruned; " + ", ".join(f"{b}" for b in BUDGETS) + " when pruned"
          " (* = wrong answer)")
    for name, (answers, stats) in columns.items():
        right = sum(a == t for a, t in zip(answers, truth))
        detail = "" if stats is None else (f"; prompt {stats.prefill_before[0]} -> {stats.prefill_after[0]} tokens, "
                                           f"selection {stats.selection_ms / len(items):.1f} ms per image")
        print(f"  {name:14s} {right}/{len(items)} right{detail}")

    normalisation = pixel_normalisation(processor)
    views = [model_view(p, normalisation["pixel_mean"], normalisation["pixel_std"]) for p in inputs["pixel_values"]]
    rows = []
    for row, item in enumerate(items):
        cells = [(views[row], f"{item.question}\ntruth: {truth[row]}")]
        for name, (answers, stats) in list(columns.items())[1:]:
            mark = "right" if answers[row] == truth[row] else "wrong"
            cells.append((draw_tokens(views[row], grids[row], stats.kept[row][0]), f"{answers[row]} ({mark})"))
        rows.append(cells)
    titles = ["image, question"] + [f"{name} tokens\n(kept of {tokens})" for name in names[1:]]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    panel(rows, titles).save(args.out)
    print(f"\nwrote {args.out} (pruned tokens darkened and hatched); {time.perf_counter() - start:.0f} s", file=sys.stderr)
