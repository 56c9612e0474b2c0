"""Kept and recycled visual tokens drawn over the image the model saw, beside it (`handle.draw`); the adapters
give the pixels and token grids (docs/architecture.md, "An adapter owns a model family")."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import InvalidInput, InvalidSetting

PRUNED_SHADE = 0.72  # how much a pruned token's cell is darkened
HATCH = (160, 160, 160)  # the diagonal lines over pruned cells, so that they show on dark images too
HATCH_PERIOD = 6  # pixels between two hatch lines
RECYCLED = (255, 150, 0)  # outline of cells holding a recycled token
SIDE = 200  # the longer side of a drawn picture, px, unless its grid needs more (MIN_CELL px per token)
MIN_CELL, MAX_SIDE = 6, 600
LINE, GAP = 14, 8  # px per line of text, px between the parts of a sheet
INK = (0, 0, 0)
CAPTION_WIDTH, SHEET_WIDTH = 150, 600  # the least width of a picture's caption, of a sheet


def model_view(pixel_values: torch.Tensor, mean, std) -> Image.Image:
    """The processed image [3, H, W] (normalised) back as RGB, as the vision tower saw it."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def draw_tokens(image: Image.Image, grid: tuple[int, int], kept: torch.Tensor, recycled: torch.Tensor | None = None) -> Image.Image:
    """Darken and hatch the cells of pruned tokens (kept ones stay as they are); outline cells that hold a
    recycled token."""
    rows, cols = grid
    width, height = image.size
    keep = np.zeros(rows * cols, dtype=bool)
    keep[kept.cpu().numpy()] = True
    cell_h, cell_w = height / rows, width / cols
    ys = (np.arange(height) / cell_h).astype(int).clip(0, rows - 1)
    xs = (np.arange(width) / cell_w).astype(int).clip(0, cols - 1)
    pruned = ~keep.reshape(rows, cols)[ys][:, xs]
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    pixels[pruned] *= 1 - PRUNED_SHADE
    on_hatch = (np.arange(height)[:, None] + np.arange(width)[None, :]) % HATCH_PERIOD == 0
    pixels[pruned & on_hatch] = HATCH
    out = Image.fromarray(pixels.round().astype(np.uint8))
    if recycled is not None and recycled.numel():
        draw = ImageDraw.Draw(out)
        for index in recycled.cpu().tolist():
            r, c = divmod(index, cols)
            draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1], outline=RECYCLED, width=2)
    return out


def fit(image: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """`image` at its own aspect ratio, its longer side SIDE px (more where its grid would leave a token less
    than MIN_CELL px, up to MAX_SIDE): sharp token blocks when enlarged, averaged pixels when shrunk."""
    width, height = image.size
    side = min(max(SIDE, MIN_CELL * max(grid)), MAX_SIDE)
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


def wrap(text: str, font, width: float) -> list[str]:
    """The lines of ``text`` (split at newlines, then between words) that fit in ``width`` pixels."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def panel(cells: list[list[tuple[Image.Image, str]]], column_titles: list[str], size: int = 160) -> Image.Image:
    """A grid of (image, caption) cells under one title per column; text is wrapped to the cell width
    (two lines at most per title, three per caption)."""
    font = ImageFont.load_default(size=11)
    title_h, caption_h, gap = 28, 42, 6
    width = len(column_titles) * (size + gap) + gap
    height = title_h + len(cells) * (size + caption_h + gap) + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(column_titles):
        for line, text in enumerate(wrap(title, font, size)[:2]):
            draw.text((gap + c * (size + gap), 2 + 12 * line), text, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        top = title_h + r * (size + caption_h + gap)
        for c, (image, caption) in enumerate(row):
            left = gap + c * (size + gap)
            sheet.paste(image.resize((size, size), Image.Resampling.BOX), (left, top))
            for line, text in enumerate(wrap(caption, font, size)[:3]):
                draw.text((left, top + size + 2 + 12 * line), text, fill=(0, 0, 0), font=font)
    return sheet


class Sheet:
    """A white page built top to bottom: lines of text wrapped to its width, and rows of captioned pictures."""

    def __init__(self, width: int, gap: int = GAP):
        self.width, self.gap = width, gap
        self.font = ImageFont.load_default(size=12)
        self.items: list[tuple[int, object]] = []  # (height, painter(page, draw, top))

    def text(self, text: str) -> None:
        lines = wrap(text, self.font, self.width - 2 * self.gap)

        def paint(page, draw, top):
            for number, line in enumerate(lines):
                draw.text((self.gap, top + LINE * number), line, fill=INK, font=self.font)

        self.items.append((LINE * len(lines) + 2, paint))

    def pictures(self, pictures: list[tuple[Image.Image, str]], column: int) -> None:
        """Pictures left to right, each in a column at least `column` px wide with its caption below."""
        widths = [max(image.width, column) for image, _ in pictures]
        captions = [wrap(caption, self.font, w) for (_, caption), w in zip(pictures, widths)]
        height = max(image.height for image, _ in pictures) + 4 + LINE * max(map(len, captions))

        def paint(page, draw, top):
            left = self.gap
            for (image, _), lines, w in zip(pictures, captions, widths):
                page.paste(image, (left, top))
                for number, line in enumerate(lines):
                    draw.text((left, top + image.height + 4 + LINE * number), line, fill=INK, font=self.font)
                left += w + self.gap

        self.items.append((height + self.gap, paint))

    def keys(self, keys: list[tuple[Image.Image, str]]) -> None:
        """A legend: swatches left to right, each with its meaning wrapped beside it."""
        column = (self.width - self.gap) // len(keys) - self.gap
        texts = [wrap(text, self.font, column - swatch.width - self.gap) for swatch, text in keys]
        height = max(max(swatch.height for swatch, _ in keys), LINE * max(map(len, texts)))

        def paint(page, draw, top):
            for number, ((swatch, _), lines) in enumerate(zip(keys, texts)):
                left = self.gap + number * (column + self.gap)
                page.paste(swatch, (left, top))
                for line, text in enumerate(lines):
                    draw.text((left + swatch.width + self.gap, top + LINE * line), text, fill=INK, font=self.font)

        self.items.append((height + self.gap, paint))

    def render(self) -> Image.Image:
        page = Image.new("RGB", (self.width, self.gap + sum(h for h, _ in self.items) + self.gap), (255, 255, 255))
        draw, top = ImageDraw.Draw(page), self.gap
        for height, paint in self.items:
            paint(page, draw, top)
            top += height
        return page


def legend(recycling: bool) -> list[tuple[Image.Image, str]]:
    """Swatches drawn by `draw_tokens` itself, with what each means."""
    sample = Image.new("RGB", (28, 28), (90, 150, 210))
    one, none = torch.tensor([0]), torch.tensor([], dtype=torch.long)
    keys = [(draw_tokens(sample, (1, 1), one), "kept: reaches the LLM (pixels as they were)"),
            (draw_tokens(sample, (1, 1), none), "pruned: removed (darkened, hatched)")]
    if recycling:
        keys.append((draw_tokens(sample, (1, 1), one, one), "orange box: the slot holds a token merged from pruned "
                                                              "ones (recycled), not its own"))
    return keys


def check_picture_path(path: str | None) -> None:
    """A clear error for a file name Pillow cannot pick a format for, before any drawing."""
    if path is None:
        return
    extension = os.path.splitext(str(path))[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise InvalidSetting(f"cannot tell which image format to write {str(path)!r} in: "
                             + (f"{extension!r} is not an image format Pillow writes" if extension else "it has no file extension")
                             + "; give a file name ending in .png (or .jpg, .webp, ...)")


def normalisation(processor) -> tuple[list, list]:
    """The image mean and std of a processor (or of an image processor given directly)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise InvalidSetting(f"draw needs the processor that made the inputs (its image_mean and image_std turn the "
                             f"pixel values back into the picture the model saw); got {type(processor).__name__}, "
                             f"which has none: pass the processor, e.g. AutoProcessor.from_pretrained(model_id)")
    return list(mean), list(std)


def count_text(stats, row: int, index: int, kept: int, total: int) -> str:
    """What the kept count of one image means: tokens at the LLM input, and for in-LLM methods (VFlowOpt)
    the counts its later stages keep and their layer average, which is what the budget sets."""
    newlines = stats.tokens_after[row][index] - kept if stats.tokens_after else 0
    video = bool(stats.videos) and stats.videos[row][index] is not None
    extra = f", plus {newlines} {'trailing' if video else 'row-end'} newline token(s)" if newlines > 0 else ""
    if not stats.stages:
        return f"{kept} of its {total} visual tokens reach the LLM{extra}."
    plan = stats.stages[row][index]
    later = ", ".join(f"{count} from layer {layer}" for count, layer in zip(plan.counts[1:], plan.layers))
    return (f"{kept} of its {total} visual tokens enter the LLM{extra} (drawn); fewer stay deeper in: {later}. "
            f"Averaged over the {plan.num_layers} layers that is {plan.layer_average:.1f} tokens, what the budget "
            f"counts for this method.")


FRAMES_PER_LINE = 4  # a video's film strip: frames (each beside its kept tokens) per line


def kept_tokens_picture(adapter, inputs: dict, processor, stats, path: str | None = None, title: str = "") -> Image.Image:
    """Every image of `inputs` (each plane of an image of several, LLaVA-NeXT/OneVision) as the model saw it,
    beside the same picture with the kept tokens of `stats` (the prefill of these inputs) marked, at its own
    aspect ratio, and every video as a film strip, each frame beside its kept tokens, under a legend; saved
    to `path` when given."""
    check_picture_path(path)
    mean, std = normalisation(processor)
    if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is None:
        raise InvalidInput("the inputs hold no images or videos (no pixel_values, no pixel_values_videos): draw the "
                           "processor's output for a prompt with images or videos, the one generate() just ran on")
    places = [(row, index) for row, images in enumerate(stats.kept) for index in range(len(images))]
    kept = [indices for images in stats.kept for indices in images]
    recycled = [indices for images in stats.recycled for indices in images] or [None] * len(kept)
    videos = [video for row in stats.videos for video in row] or [None] * len(kept)
    image_items = [item for item, video in enumerate(videos) if video is None]
    video_items = [item for item, video in enumerate(videos) if video is not None]
    cells = adapter.picture_cells(inputs) if inputs.get("pixel_values") is not None else []
    strips = adapter.video_views(inputs) if inputs.get("pixel_values_videos") is not None else []
    images = len({image for image, _, _ in cells})
    if (len(image_items), len(video_items)) != (images, len(strips)):
        raise InvalidInput(f"the stats hold {len(image_items)} image(s) and {len(video_items)} video(s) but the inputs "
                           f"{images} and {len(strips)}: draw right after the generate() call on these inputs")
    blocks: list[list[list[tuple[Image.Image, str]]]] = [[[]] for _ in kept]  # per item: lines of pictures
    drawn, shown = [0] * len(kept), [0] * len(kept)
    if cells:
        for view, grid, (image, name, tokens) in zip(adapter.pixel_views(inputs), adapter.image_grids(inputs), cells):
            item = image_items[image]
            # the picture's cells that show a kept (recycled) token of its image
            on = torch.nonzero(torch.isin(tokens, kept[item].to(tokens.device))).flatten()
            merged = None if recycled[item] is None else torch.nonzero(torch.isin(tokens, recycled[item].to(tokens.device))).flatten()
            seen = fit(model_view(view, mean, std), grid)
            blocks[item][0] += [(seen, f"{name} as the model saw it ({view.shape[2]}x{view.shape[1]} px)"),
                                (draw_tokens(seen, grid, on, merged), f"{on.numel()} of {grid[0] * grid[1]} tokens kept")]
            drawn[item] += on.numel()
            shown[item] += grid[0] * grid[1]
    for item, (frames, grid) in zip(video_items, strips):
        size = grid[0] * grid[1]
        lines = blocks[item] = []
        for number, frame in enumerate(frames):
            window = (kept[item] >= number * size) & (kept[item] < (number + 1) * size)
            on = kept[item][window] - number * size
            merged = None if recycled[item] is None else recycled[item][(recycled[item] >= number * size) & (recycled[item] < (number + 1) * size)] - number * size
            seen = fit(model_view(frame, mean, std), grid)
            if number % FRAMES_PER_LINE == 0:
                lines.append([])
            lines[-1] += [(seen, f"frame {number} as the model saw it"), (draw_tokens(seen, grid, on, merged),
                                                                           f"{on.numel()} of {size} tokens kept")]
            drawn[item] += on.numel()
            shown[item] += size
    width = max(SHEET_WIDTH, max(GAP + sum(max(p.width, CAPTION_WIDTH) + GAP for p, _ in line) for block in blocks for line in block))
    sheet = Sheet(width)
    sheet.text("Visual tokens kept" + (f": {title}" if title else ""))
    sheet.keys(legend(any(r is not None and r.numel() for r in recycled)))
    for item, block in enumerate(blocks):
        row, index = places[item]
        what = "image" if videos[item] is None else f"video (of {videos[item].frames} frames, {videos[item].scope.replace('_', ' ')})"
        sheet.text(f"Row {row}, {what} {index} of the row: " + count_text(stats, row, index, drawn[item], shown[item]))
        for line in block:
            sheet.pictures(line, CAPTION_WIDTH)
    picture = sheet.render()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        picture.save(path)
    return picture
