"""Can the demo model's image features tell which character an object carries? A diagnostic.

For every object with a character, its feature is the mean of the patch features weighted by how many of
the character's pixels each 16 px patch holds. A linear classifier (softmax regression, Adam, full batch) is
fitted on train-stream images and scored on validation images, once on the tower's features at the layer
the LLM reads (-2) and once after the projector. A high score says the features carry the character; the
LLM still has to learn to read it. Chance is 1/17.

    python benchmarks/reading_probe.py [--model prunevlm/demo/model] [--checkpoint STAGE.pt]
        [--train-images 3000] [--val-images 400]

`--checkpoint` loads a `prunevlm.demo.train` stage checkpoint into the model first (the probe of a stage).
"""

from __future__ import annotations

import argparse
import json

import torch

from prunevlm.demo import accuracy, dataset, llava_forward

TRAIN_OFFSET = 500_000  # train-stream images far beyond those the demo training used


@torch.no_grad()
def object_features(model, processor, samples, batch: int = 32):
    """(tower [M, D], projected [M, D'], characters [M]) for the M objects that carry a character."""
    patch = model.config.vision_config.patch_size
    tower, projected, chars = [], [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        feats = llava_forward.tower_features(model, llava_forward.pixels(processor, chunk))
        proj = model.model.multi_modal_projector(feats)
        for sample, f, p in zip(chunk, feats, proj):
            ink = dataset.patch_cover(dataset.text_mask(sample), patch, len(sample.objects))
            for i, obj in enumerate(sample.objects):
                if obj.text is not None:
                    weights = torch.from_numpy(ink[:, i]).float()
                    weights /= weights.sum()
                    tower.append(weights @ f)
                    projected.append(weights @ p)
                    chars.append(dataset.CHARS.index(obj.text))
    return torch.stack(tower), torch.stack(projected), torch.tensor(chars)


def linear_probe(x, y, x_val, y_val, steps: int = 500, seed: int = 0) -> dict:
    """Train and validation accuracy of a softmax regression on standardised features."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_val = (x - mean) / std, (x_val - mean) / std
    classifier = torch.nn.Linear(x.shape[1], len(dataset.CHARS))
    optimizer = torch.optim.Adam(classifier.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return {"train": round((classifier(x).argmax(1) == y).float().mean().item(), 3),
                "val": round((classifier(x_val).argmax(1) == y_val).float().mean().item(), 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(accuracy.MODEL_DIR))
    parser.add_argument("--checkpoint", default=None, help="a prunevlm.demo.train stage checkpoint (.pt)")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = accuracy.load(args.model)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, weights_only=True)["model"])
    train_samples = [dataset.render("train", TRAIN_OFFSET + i) for i in range(args.train_images)]
    val_samples = dataset.generate("val", args.val_images)
    (tower, projected, y), (tower_val, projected_val, y_val) = (
        object_features(model, processor, samples) for samples in (train_samples, val_samples))
    result = {"model": args.model, "checkpoint": args.checkpoint, "objects": [len(y), len(y_val)],
              "tower": linear_probe(tower, y, tower_val, y_val),
              "projected": linear_probe(projected, y, projected_val, y_val)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
