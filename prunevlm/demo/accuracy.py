"""Exact-match VQA accuracy of a LLaVA-style model on demo dataset items.

    evaluate(model, processor, items, batch_size=32) -> dict
    predict(model, processor, items, batch_size=32, return_states=False) -> answers[, states]
    right(items, answers) -> list[bool]                 # per item: exact match
    score(items, answers) -> dict
    load(folder=MODEL_DIR) -> (model, processor)
    test_items(n_images=200, seed=0, split='test') -> list[Item]  # a held-out split

``evaluate`` renders the chat prompt for each item (``loading.prompt_inputs``), runs one left-padded batched
``model.generate(**inputs)`` per batch (greedy, the model's generation config) and compares the
normalised decoded answer with the reference. Pruning hooks attached to ``model`` around the call
apply unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import DEMO_MODEL
from ..errors import InvalidInput, InvalidSetting, LoadError
from ..loading import prompt_inputs
from . import dataset

MODEL_DIR = Path(DEMO_MODEL)


def load(folder: str | Path = MODEL_DIR, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """The model (eval mode, ``dtype``, on ``device``) and processor saved in ``folder``, loaded offline;
    ``dtype`` and ``device`` may be the CLI's names ('auto', 'bfloat16', 'cuda', ...)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..loading import from_pretrained, resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LoadError(f"no config.json in {folder}: it holds no model; train one with "
                        "`python -m prunevlm.demo.train --out DIR`")
    model = from_pretrained(LlavaForConditionalGeneration, folder, dtype=dtype).to(resolve_device(device)).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_items(n_images: int = 200, seed: int = 0, split: str = "test") -> list[dataset.Item]:
    """Flattened questions of the first ``n_images`` images of a held-out split (``test``, 6 per
    image, or ``crowded``, 3 per image)."""
    return dataset.flatten(dataset.generate(split, n_images, seed))


@torch.inference_mode()
def predict(model, processor, items: list[dataset.Item], batch_size: int = 32,
            return_states: bool = False):
    """Normalised greedy answers, one per item, from left-padded batched ``generate``.

    With ``return_states`` also the [N, D] final-norm hidden state of each prompt's last token at
    prefill (VFlowOpt's flow measure, docs/vflowopt.md §4), read from the same ``generate`` call."""
    if batch_size < 1:
        raise InvalidSetting(f"batch_size must be >= 1, got {batch_size}")
    answers, states = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        inputs = prompt_inputs(processor, [it.image for it in batch], [it.question for it in batch], model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, return_dict_in_generate=True,
                             output_hidden_states=return_states)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        answers += [dataset.normalize(t) for t in
                    processor.batch_decode(new, skip_special_tokens=True)]
        if return_states:  # step 0 is the prefill; its last layer entry is after the final norm
            states.append(out.hidden_states[0][-1][:, -1].float())
    return (answers, torch.cat(states)) if return_states else answers


def right(items: list[dataset.Item], answers: list[str]) -> list[bool]:
    """Per item, whether the normalised answer is the reference's exact match."""
    return [got == dataset.normalize(it.answer) for it, got in zip(items, answers, strict=True)]


def score(items: list[dataset.Item], answers: list[str]) -> dict:
    """Exact-match accuracy per question type plus ``overall`` and ``n`` (number of questions)."""
    if not items:
        raise InvalidInput("no items to evaluate: give at least one question")
    hits: dict[str, list[bool]] = {}
    for it, hit in zip(items, right(items, answers)):
        hits.setdefault(it.qtype, []).append(hit)
    out = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    out["overall"] = sum(sum(h) for h in hits.values()) / len(items)
    out["n"] = len(items)
    return out


def evaluate(model, processor, items: list[dataset.Item], batch_size: int = 32) -> dict:
    """``score`` of the greedy answers to ``items``."""
    return score(items, predict(model, processor, items, batch_size))
