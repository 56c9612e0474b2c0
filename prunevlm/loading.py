"""Load a VLM and its processor with from_pretrained, turn images + a question into model inputs, and read
the processor's pixel normalisation."""

from __future__ import annotations

import torch
from PIL import Image

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(model_id: str, dtype: str = "auto", device: str = "auto", attn: str = "sdpa"):
    """`from_pretrained` of a hub id or a local folder: (model in eval mode, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except Exception as error:  # transformers raises many types here; say what failed and why
        raise RuntimeError(
            f"could not load the processor of {model_id!r}: {error}. A local folder needs the processor files "
            f"(save them with processor.save_pretrained); Qwen video processors also need torchvision."
        ) from error
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=DTYPES[dtype], attn_implementation=attn)
    return model.to(device).eval(), processor


def pixel_normalisation(processor) -> dict:
    """The image processor's normalisation, as VFlowOpt's `pixel_mean`/`pixel_std` options (its entropy
    undoes it to get raw grey levels; docs/vflowopt.md §2.2)."""
    image_processor = processor.image_processor
    return {"pixel_mean": list(image_processor.image_mean), "pixel_std": list(image_processor.image_std)}


def prompt_inputs(processor, images: list[Image.Image], questions: list[str], device) -> dict:
    """A left-padded batch: one question per row, each row with its image (None for a text-only row)."""
    texts = []
    for image, question in zip(images, questions):
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if getattr(processor, "chat_template", None):
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        else:
            image_token = getattr(processor, "image_token", "<image>")
            texts.append((f"{image_token}\n" if image is not None else "") + question)
    given = [image for image in images if image is not None]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    inputs = processor(images=given or None, text=texts, return_tensors="pt", padding=True)
    return inputs.to(device)
