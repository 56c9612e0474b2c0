"""`prunevlm calibrate`: VFlowOpt's flow-guided hyper-parameter search, resumable and shareable."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
from PIL import Image

from ..defaults import RESULTS
from ..errors import InvalidInput
from ..config import save_config
from ..loading import jsonl_rows, pixel_normalisation, read_image
from ..methods.vflowopt import default_layers
from ..models import get_adapter
from .search import FlowObjective, run_search, samples_digest, search_space
from .storage import check_trials, open_study, prepare_study, storage_name


def demo_samples(count: int, seed: int, first_image: int = 0) -> list[tuple[Image.Image, str]]:
    """(image, question) pairs from the demo dataset's validation split, one random question per image."""
    from ..demo import dataset

    rng = random.Random(seed)
    samples = []
    for index in range(first_image, first_image + count):
        sample = dataset.render("val", index, seed)
        samples.append((sample.image, rng.choice(sample.questions).text))
    return samples


def jsonl_samples(path: str) -> list[tuple[Image.Image, str]]:
    """(image, prompt) pairs from a JSONL file of {"image": path, "prompt": text} (`loading.jsonl_rows`),
    one image per row."""
    samples = []
    for number, (images, prompt) in enumerate(jsonl_rows(path), 1):
        if len(images) != 1:
            raise InvalidInput(f"{path}: row {number} has {len(images)} images; calibration takes one per row")
        samples.append((read_image(images[0]), prompt))
    return samples


def run(args) -> dict:
    """The calibration command (docs/calibration.md): the study is opened and checked before the model loads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        samples = jsonl_samples(args.data)
        holdout = samples[args.samples : args.samples + args.holdout]
        samples = samples[: args.samples]
    else:
        samples = demo_samples(args.samples, args.seed)
        holdout = demo_samples(args.holdout, args.seed, first_image=10_000) if args.holdout else []
    tag = f"T{args.budget.value:g}"
    out = args.out or f"{RESULTS}/vflowopt-{tag}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)  # the study's storage goes beside it
    storage = args.storage or str(Path(out).with_suffix(".db"))
    study_name = args.study or f"vflowopt-{tag}"
    beside = out if "://" in storage else storage  # the unpruned states, reused when resuming
    cache = str(Path(beside).with_suffix(f".{study_name}.refs.safetensors"))
    study = open_study(storage, study_name, args.seed, args.initial)
    prepare_study(study, storage, budget=args.budget.value, samples=samples_digest(samples))
    check_trials(study, storage, search_space(args.budget.value), len(samples))

    if args.model is None:
        from ..demo.accuracy import MODEL_DIR, load

        model, processor = load(MODEL_DIR, args.dtype, args.device)
        model_id = "prunevlm demo model"
    else:
        from ..loading import load

        model, processor = load(args.model, args.dtype, args.device)
        model_id = args.model
    depth = get_adapter(model).num_layers
    layers = default_layers(depth)
    prepare_study(study, storage, layers=list(layers))
    fixed = pixel_normalisation(processor)

    print(f"calibrating vflowopt at T={args.budget} on {len(samples)} samples, {args.trials} trials "
          f"(study {study_name!r} in {storage_name(storage)})", file=sys.stderr)
    objective = FlowObjective(model, processor, samples, args.budget, args.batch_size, cache=cache)
    best = run_search(objective, study, args.trials, depth, layers, fixed)
    options = {k: best[k] for k in ("r_v", "r_1", "t", "m", "alpha", "layers", *fixed)}
    report = {"objective": best["value"], "default_objective": best["default_value"],
              "best_is_default": best["is_default"], "samples": len(samples)}
    if holdout:
        held = FlowObjective(model, processor, holdout, args.budget, args.batch_size)
        report["holdout"] = {"samples": len(holdout), "calibrated": held(options) / len(holdout),
                             "default": held({"layers": list(layers), **fixed}) / len(holdout)}
    import optuna

    saved = save_config(
        out, "vflowopt", args.budget, options, model=model_id, study=study_name,
        storage=storage_name(storage) if "://" in storage else os.path.abspath(storage), trials=args.trials,
        seed=args.seed, best_trial=best["number"], **report,
        versions={"torch": torch.__version__, "optuna": optuna.__version__,
                  "transformers": __import__("transformers").__version__},
    )
    if best["is_default"]:
        print(f"best flow objective {best['value']:.4f} of {len(samples)}: the default configuration (trial "
              f"{best['number']}); no searched one beat it")
    else:
        print(f"best flow objective {best['value']:.4f} of {len(samples)}, trial {best['number']} "
              f"(default config {best['default_value']:.4f})")
    if holdout:
        h = report["holdout"]
        print(f"held-out mean cosine over {h['samples']} samples: calibrated {h['calibrated']:.4f}, default {h['default']:.4f}")
    print(f"wrote {out}: prunevlm.prune(model, 'vflowopt', config={out!r})")
    return saved
