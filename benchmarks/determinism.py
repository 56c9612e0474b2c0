"""How far `prunevlm eval` is deterministic: the kept tokens and the answers of the demo test split under
other thread counts and batch sizes than eval's, against eval's own setting.

A different thread count or batch shape changes the order in which BLAS sums the vision tower's and the
LLM's products, so features differ in the last bits; where two tokens' scores are that close, the ranking,
and so the kept set, can flip. This counts how often that happens and how often it changes an answer.

    python benchmarks/determinism.py [--images 100] [--budgets 32,16] [--out prunevlm-results/determinism.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import prunevlm
from prunevlm.demo import accuracy, dataset

SETTINGS = (("eval's: 2 threads, batch 48", 2, 48), ("1 thread, batch 48", 1, 48), ("2 threads, batch 7", 2, 7))


def run_setting(model, processor, items, method: str, budget: int, threads: int, batch: int):
    """(kept index sets per prompt, normalised answers) under one thread count and batch size."""
    torch.set_num_threads(threads)
    kept, answers = [], []
    with prunevlm.prune(model, method, budget) as handle:
        for start in range(0, len(items), batch):
            part = items[start : start + batch]
            answers += accuracy.predict(model, processor, part, batch_size=batch)
            kept += [frozenset(row[0].tolist()) for row in handle.stats.kept]
    return kept, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="test images; 6 questions each")
    parser.add_argument("--methods", default="flashvlm,vispruner")
    parser.add_argument("--budgets", default="32,16")
    parser.add_argument("--out", default="prunevlm-results/determinism.json")
    args = parser.parse_args()
    model, processor = accuracy.load()
    items = dataset.flatten(dataset.generate("test", args.images))
    rows = []
    for method in args.methods.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            reference = None
            for name, threads, batch in SETTINGS:
                kept, answers = run_setting(model, processor, items, method, budget, threads, batch)
                if reference is None:
                    reference = kept, answers
                    continue
                kept_differ = sum(a != b for a, b in zip(kept, reference[0]))
                tokens_differ = sum(len(a - b) for a, b in zip(kept, reference[0]))
                answers_differ = sum(a != b for a, b in zip(answers, reference[1]))
                row = {"method": method, "budget": budget, "setting": name, "prompts": len(items),
                       "prompts_with_other_kept_tokens": kept_differ, "kept_tokens_swapped": tokens_differ,
                       "answers_changed": answers_differ}
                rows.append(row)
                print(f"{method} {budget:3d} {name:20s}: kept set differs on {kept_differ}/{len(items)} prompts "
                      f"({tokens_differ} tokens swapped), answer differs on {answers_differ}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"reference": SETTINGS[0][0], "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
