"""Load a VLM and its processor with from_pretrained, turn images + questions into model inputs, and read
the processor's pixel normalisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from .errors import InvalidInput, InvalidSetting, LoadError, Unsupported

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' is cuda when available, else cpu; anything else is checked by torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise InvalidSetting(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSetting(f"--device {device!r}: this torch sees no CUDA device; use --device cpu")
    return resolved


def resolve_dtype(dtype: str):
    if dtype not in DTYPES:
        raise InvalidSetting(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_supported(model_id: str) -> None:
    """Refuse `model_id`, before any weights or processor files are read, when the class `from_pretrained`
    would build for it has no prunevlm adapter."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .models import adapter_class, supported_models

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as error:  # transformers raises many types here; say what failed and why
        raise LoadError(f"could not read the model config of {model_id!r}: {error}") from error
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
    if model_class is None:
        raise Unsupported(
            f"{model_id!r} holds a {config.model_type!r} model ({', '.join(config.architectures or ['?'])}), not a "
            f"vision-language model; prunevlm supports {', '.join(supported_models())}"
        )
    adapter_class(model_class)


def load(model_id: str, dtype: str = "auto", device: str = "auto", attn: str = "sdpa"):
    """`from_pretrained` of a hub id or a local folder: (model in eval mode, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype, target = resolve_dtype(dtype), resolve_device(device)
    check_supported(model_id)
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except Exception as error:  # transformers raises many types here; say what failed and why
        raise LoadError(
            f"could not load the processor of {model_id!r}: {error}. A local folder needs the processor files "
            f"(save them with processor.save_pretrained); Qwen video processors also need torchvision."
        ) from error
    model = from_pretrained(AutoModelForImageTextToText, model_id, dtype=torch_dtype, attn_implementation=attn)
    return model.to(target).eval(), processor


def from_pretrained(model_class, model_id, **kwargs):
    """`model_class.from_pretrained(model_id, **kwargs)`, with a LoadError that says so where a weights file
    is damaged (truncated by an interrupted download or copy, or not safetensors at all)."""
    from safetensors import SafetensorError

    try:
        return model_class.from_pretrained(model_id, **kwargs)
    except SafetensorError as error:
        raise LoadError(f"the weights of {str(model_id)!r} are damaged ({error}): a .safetensors file is truncated or "
                        f"is not safetensors; download or save_pretrained the model again") from None


def pixel_normalisation(processor) -> dict:
    """The image processor's normalisation, as VFlowOpt's `pixel_mean`/`pixel_std` options (its entropy
    undoes it to get raw grey levels; docs/vflowopt.md §2.2)."""
    image_processor = processor.image_processor
    return {"pixel_mean": list(image_processor.image_mean), "pixel_std": list(image_processor.image_std)}


def with_processor_normalisation(method, processor, given) -> object:
    """`method` (a Method) with the processor's normalisation as its pixel options, when it has them and the
    option names `given` (the user's options and a config's) hold neither: a checkpoint's processor may
    differ from the CLIP default (LLaVA-OneVision's SigLIP uses 0.5; docs/vflowopt.md §5)."""
    names = {"pixel_mean", "pixel_std"}
    if names & set(given) or not names <= set(method.options()):
        return method
    return dataclasses.replace(method, **pixel_normalisation(processor))


def prompt_inputs(processor, images: list, questions: list[str], device) -> dict:
    """A left-padded batch, one question per row. Each row's entry of `images` is an image, a list of images
    (all placed before the question) or None for a text-only row. The chat template inserts one image
    placeholder per image, so a question must not contain the placeholder itself."""
    image_token = getattr(processor, "image_token", "<image>")
    texts, given = [], []
    for row, (entry, question) in enumerate(zip(images, questions)):
        row_images = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if image_token in question:
            raise InvalidInput(
                f"row {row}: the question contains the image placeholder {image_token!r}; pass the question as "
                f"plain text: the chat template adds one placeholder per image ({len(row_images)} here)"
            )
        content = [{"type": "image"} for _ in row_images] + [{"type": "text", "text": question}]
        if getattr(processor, "chat_template", None):
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        else:
            texts.append("".join(f"{image_token}\n" for _ in row_images) + question)
        given += row_images
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    inputs = processor(images=given or None, text=texts, return_tensors="pt", padding=True)
    return inputs.to(device)


def read_image(path: str | Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as error:
        raise InvalidInput(f"cannot read image {str(path)!r}: {error}") from None


def jsonl_rows(path: str) -> list[tuple[list[str], str]]:
    """(image paths, prompt) per line of {"image": path | [paths] | null, "prompt": text}; relative paths are
    read from the file's folder."""
    folder, rows = Path(path).parent, []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                images, prompt = record.get("image"), record["prompt"]
            except (ValueError, RecursionError, KeyError, AttributeError) as error:  # ValueError: not JSON
                raise InvalidInput(f"{path}:{number}: expected {{\"image\": path or [paths] or null, \"prompt\": text}}: "
                                   f"{str(error)[:200]}") from None
            images = [] if images is None else [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise InvalidInput(f"{path}:{number}: image must be a path, a list of paths or null, got {images!r}")
            missing = [p for p in images if not (folder / p).is_file()]
            if missing or not isinstance(prompt, str):
                raise InvalidInput(f"{path}:{number}: " + (f"no image file(s) {missing} (relative to {folder})" if missing
                                                        else f"prompt must be text, got {prompt!r}"))
            rows.append(([str(folder / p) for p in images], prompt))
    if not rows:
        raise InvalidInput(f"{path} holds no rows")
    return rows
