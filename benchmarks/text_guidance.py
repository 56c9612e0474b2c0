"""Does the prompt steer FlashVLM to the object a question is about? A diagnostic on the demo model.

For every test question that names objects (the `refs` of the dataset), the object's patches are the 16 px
patches it covers by at least 20 %. Each method keeps k tokens per image; we report, per question type, the
share of kept tokens on the named objects and the share of questions with at least one kept token on
every named object, beside what uniform chance gives (the objects' share of the image). Second, the raw
text relevance alone (docs/flashvlm.md §2 steps 1-3, on the question's words only): of its top 8 tokens that
lie on any object, the share on the named objects, beside the named objects' share of all object patches;
equal shares mean the words find objects but not the one they name (the "all" row pools every question: the
object-word alignment figure of docs/demo.md).

    python benchmarks/text_guidance.py [--model DIR] [--split test|crowded] [--images 200] [--budgets 16,32]
        [--out benchmarks/results/text_guidance.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import prunevlm
from prunevlm.demo import accuracy, dataset
from prunevlm.methods.flashvlm import text_relevance
from prunevlm.models import get_adapter

METHODS = ("flashvlm", "vispruner", "uniform")


def object_patches(sample: dataset.Sample, patch: int) -> list[set[int]]:
    """Per object, the row-major indices of the patches it covers by at least 20 %."""
    cover = dataset.patch_cover(dataset.object_mask(sample), patch, len(sample.objects))
    return [set(np.nonzero(column >= 0.2 * patch * patch)[0].tolist()) for column in cover.T]


@torch.inference_mode()
def relevance_on_named(model, processor, cases, top: int = 8) -> list[dict]:
    """Per question type: share of the top relevance tokens on objects that are on the named objects."""
    by_type: dict[str, list[tuple[float, float]]] = {}
    for sample, question, objects in cases:  # objects: the patches of every object in the image
        pixels = processor.image_processor([sample.image], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output[0][None]  # [1, 144, D] projected
        ids = processor.tokenizer(question.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        chosen = set(text_relevance(image, model.get_input_embeddings()(ids))[0].topk(top).indices.tolist())
        named, every_object = set().union(*(objects[i] for i in question.refs)), set().union(*objects)
        on_objects = chosen & every_object
        if on_objects:
            by_type.setdefault(question.qtype, []).append((len(on_objects & named) / len(on_objects), len(named) / len(every_object)))
    rows = {qtype: by_type[qtype] for qtype in sorted(by_type)}
    rows["all"] = [pair for pairs in rows.values() for pair in pairs]
    return [{"qtype": qtype, "questions": len(v), "named_share_of_top_on_objects": float(np.mean([a for a, _ in v])),
             "named_share_of_object_patches": float(np.mean([b for _, b in v]))} for qtype, v in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=accuracy.MODEL_DIR, help="a demo model folder (default: the bundled one)")
    parser.add_argument("--split", default="test", choices=dataset.HELD_OUT)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--budgets", default="16,32")
    parser.add_argument("--out", default="benchmarks/results/text_guidance.json")
    args = parser.parse_args()
    model, processor = accuracy.load(args.model)
    samples = dataset.generate(args.split, args.images)
    grid = get_adapter(model).image_grids(processor.image_processor([samples[0].image], return_tensors="pt"))[0]
    # every demo image has this grid; a token covers patch x patch pixels
    patch, tokens = dataset.IMAGE_SIZE // grid[1], grid[0] * grid[1]
    cases = []
    for sample in samples:
        objects = object_patches(sample, patch)
        cases += [(sample, q, objects) for q in sample.questions if q.refs]
    items = [dataset.Item(s.image, q.text, q.answer, q.qtype) for s, q, _ in cases]
    results = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        for method in METHODS:
            with prunevlm.prune(model, method, budget) as handle:
                kept = []
                for start in range(0, len(items), 48):
                    accuracy.predict(model, processor, items[start:start + 48], batch_size=48)
                    kept += [set(row[0].tolist()) for row in handle.stats.kept]
            by_type: dict[str, list[tuple[float, bool, float]]] = {}
            for (_, q, objects), chosen in zip(cases, kept):
                named = [objects[i] for i in q.refs]
                union = set().union(*named)
                by_type.setdefault(q.qtype, []).append((
                    len(chosen & union) / len(chosen), all(chosen & o for o in named), len(union) / tokens))
            for qtype, values in sorted(by_type.items()):
                on, every, chance = (float(np.mean([v[i] for v in values])) for i in range(3))
                results.append({"method": method, "budget": budget, "qtype": qtype, "questions": len(values),
                                "kept_on_named": on, "all_named_hit": every, "chance_share": chance})
    print("| budget | question type | method | kept tokens on the named objects | questions with every named object hit | objects' share of the image |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['budget']} | {r['qtype']} ({r['questions']}) | {r['method']} | {100 * r['kept_on_named']:.1f} % | "
              f"{100 * r['all_named_hit']:.1f} % | {100 * r['chance_share']:.1f} % |")
    relevance = relevance_on_named(model, processor, cases)
    print("\n| question type | top-8 text-relevance tokens on objects: share on the named ones | named objects' share of object patches |")
    print("|---|---|---|")
    for r in relevance:
        print(f"| {r['qtype']} ({r['questions']}) | {100 * r['named_share_of_top_on_objects']:.1f} % | {100 * r['named_share_of_object_patches']:.1f} % |")
    with open(args.out, "w") as f:
        json.dump({"model": str(args.model), "split": args.split, "images": args.images, "rows": results, "text_relevance": relevance, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
