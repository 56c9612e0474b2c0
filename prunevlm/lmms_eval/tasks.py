"""The demo test split as lmms-eval tasks: `export(folder)` writes the images, a JSONL of questions and the task
YAML; the functions below are what the YAML names (`!function prunevlm.lmms_eval.tasks.<name>`), so the
exported folder holds no code. Neither imports lmms-eval.

The metric is `prunevlm eval`'s: exact match of the normalised answer (`demo.dataset.normalize`), overall
(`exact_match`) and per question type (`exact_match_<type>`, the mean over the documents of that type).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image

from ..demo import dataset
from ..errors import InvalidSetting

TASK = "prunevlm_demo"
# What `prunevlm eval` generates with: greedy, the demo model's max_new_tokens (its generation_config.json).
MAX_NEW_TOKENS = 4


def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def process_results(doc: dict, results: list[str]) -> dict:
    """`exact_match` for every document; `exact_match_<type>` holds it for its own type and None for the others
    (`mean_of_present` skips those)."""
    hit = float(dataset.normalize(results[0]) == dataset.normalize(doc["answer"]))
    return {"exact_match": hit, **{f"exact_match_{q}": hit if doc["qtype"] == q else None for q in dataset.QTYPES}}


def mean_of_present(values: list) -> float:
    """The mean of the values that are not None; NaN when a limited run holds no document of that type."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


def task_yaml(data_file: str) -> str:
    functions = "!function prunevlm.lmms_eval.tasks"
    per_type = "".join(
        f"  - metric: exact_match_{q}\n    aggregation: {functions}.mean_of_present\n    higher_is_better: true\n"
        for q in dataset.QTYPES
    )
    return (
        f"# Written by `prunevlm export-lmms-tasks`: the demo test split, scored as `prunevlm eval` scores it.\n"
        f"task: {TASK}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(data_file)}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: {functions}.doc_to_visual\n"
        f"doc_to_text: question\n"  # plain text, as `prunevlm eval` asks it: the chat template adds the image
        f"doc_to_target: answer\n"
        f"process_results: {functions}.process_results\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n  do_sample: false\n  num_beams: 1\n"
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n{per_type}"
        f"metadata:\n  version: 1.0\n"
    )


def export(folder: str | os.PathLike, images: int = 200, seed: int = 0) -> Path:
    """Write the first `images` test images (6 questions each, in `prunevlm eval`'s order) to `folder`:
    images/*.png, prunevlm_demo.jsonl (absolute image paths) and prunevlm_demo.yaml (the JSONL's absolute
    path). Point lmms-eval at it with `--include_path FOLDER --tasks prunevlm_demo`; export again after
    moving the folder. Returns the YAML's path."""
    if not isinstance(images, int) or images < 1:
        raise InvalidSetting(f"images must be an int >= 1, got {images!r}")
    root = Path(folder).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InvalidSetting(f"{str(folder)!r} is a file, not a folder")
    (root / "images").mkdir(parents=True, exist_ok=True)
    data_file = root / f"{TASK}.jsonl"
    with open(data_file, "w") as f:
        for index, sample in enumerate(dataset.generate("test", images, seed)):
            path = root / "images" / f"test-{index:05d}.png"
            sample.image.save(path)
            for question in sample.questions:
                row = {"image": str(path), "question": question.text, "answer": question.answer,
                       "qtype": question.qtype, "image_index": index}
                f.write(json.dumps(row) + "\n")
    yaml_path = root / f"{TASK}.yaml"
    yaml_path.write_text(task_yaml(str(data_file)))
    return yaml_path


def usage(yaml_path: Path) -> str:
    """What to tell after an export: the file written and the lmms-eval command that runs it."""
    return (f"wrote {yaml_path}; run: lmms-eval --model prunevlm --model_args pretrained=...,method=...,budget=... "
            f"--include_path {yaml_path.parent} --tasks {TASK}")
