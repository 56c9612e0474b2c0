"""Load a VLM and its processor with from_pretrained, turn images, videos and questions into model inputs,
decode videos (a file through PyAV, the `video` extra, or a folder of frame images), and read the
processor's pixel normalisation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from PIL import Image

from .errors import InvalidInput, InvalidSetting, LoadError, Unsupported

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VIDEO_FRAMES = 16  # frames sampled evenly from a video when no count is given (generate --video-frames)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # frame images in a video folder


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


def prompt_inputs(processor, images: list, questions: list[str], device, videos: list | None = None) -> dict:
    """A left-padded batch, one question per row. Each row's entry of `images` is an image, a list of images
    (all placed before the question) or None for a text-only row; of `videos` (if given), None or a list of
    videos, each a list of frames (`read_video`), placed after the row's images. The chat template inserts
    one placeholder per image and per video, so a question must not contain a placeholder itself."""
    placeholders = [getattr(processor, "image_token", "<image>"), getattr(processor, "video_token", "<video>")]
    videos = videos or [None] * len(questions)
    texts, given, given_videos = [], [], []
    for row, (entry, clips, question) in enumerate(zip(images, videos, questions)):
        row_images = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        row_videos = list(clips or [])
        inside = [(kind, token) for kind, token in zip(("image", "video"), placeholders) if token in question]
        if inside:
            raise InvalidInput(
                f"row {row}: the question contains the {inside[0][0]} placeholder {inside[0][1]!r}; pass the question "
                f"as plain text: the chat template adds one placeholder per image and per video ({len(row_images)} "
                f"and {len(row_videos)} here)"
            )
        content = ([{"type": "image"} for _ in row_images] + [{"type": "video"} for _ in row_videos]
                   + [{"type": "text", "text": question}])
        if getattr(processor, "chat_template", None):
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        else:
            texts.append("".join(f"{token}\n" for token, count in zip(placeholders, (len(row_images), len(row_videos)))
                                 for _ in range(count)) + question)
        given += row_images
        given_videos += row_videos
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    media = {"videos": given_videos} if given_videos else {}  # a processor without videos takes no such argument
    inputs = processor(images=given or None, text=texts, return_tensors="pt", padding=True, **media)
    return inputs.to(device)


def evenly(count: int, wanted: int) -> list[int]:
    """min(count, wanted) indices of 0..count-1 spread evenly: the middle of each of `wanted` equal spans."""
    if count <= wanted:
        return list(range(count))
    return [int((i + 0.5) * count / wanted) for i in range(wanted)]


def frame_files(folder: str | Path) -> list[Path]:
    """The frame images of a video folder in their order: by name, numbers compared as numbers (frame_2
    before frame_10). A folder without any is refused."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not files:
        raise InvalidInput(f"the video folder {str(folder)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)}); "
                           f"give a folder of frames or a video file")
    return sorted(files, key=lambda p: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p.name)])


def read_video(path: str | Path, frames: int = VIDEO_FRAMES) -> list[Image.Image]:
    """`frames` RGB frames spread evenly over a video (all of them if it has fewer): a folder of frame
    images (`frame_files`) or a video file, decoded with PyAV (`pip install 'prunevlm[video]'`). The frames
    of one video must share one size."""
    if Path(path).is_dir():
        files = frame_files(path)
        chosen = [read_image(files[i]) for i in evenly(len(files), frames)]
    else:
        chosen = _decode(path, frames)
    sizes = sorted({frame.size for frame in chosen})
    if len(sizes) > 1:
        raise InvalidInput(f"the frames of the video {str(path)!r} differ in size {sizes}; a video's frames share one "
                           f"size (resize them first)")
    return chosen


def _decode(path: str | Path, frames: int) -> list[Image.Image]:
    """The evenly spread frames of a video file, decoded by PyAV: one pass to count the frames where the
    container does not say, one to keep the chosen ones."""
    try:
        import av
    except ImportError:
        raise InvalidSetting(f"reading the video file {str(path)!r} needs PyAV: pip install 'prunevlm[video]' (or "
                             f"give a folder of its frames as images)") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInput(f"{str(path)!r} holds no video stream")
            count = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        wanted = set(evenly(count, frames))
        with av.open(str(path)) as container:
            chosen = [frame.to_image() for index, frame in enumerate(container.decode(video=0)) if index in wanted]
    except av.FFmpegError as error:
        raise InvalidInput(f"cannot decode the video {str(path)!r}: {error}") from None
    if not chosen:
        raise InvalidInput(f"the video {str(path)!r} holds no frames")
    return chosen


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
