"""Kept and recycled visual tokens drawn over the image the model saw."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PRUNED_SHADE = 0.72  # how much a pruned token's cell is darkened
RECYCLED = (255, 150, 0)  # outline of cells holding a recycled token


def model_view(pixel_values: torch.Tensor, mean, std) -> Image.Image:
    """The processed image [3, H, W] (normalised) back as RGB, as the vision tower saw it."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = ((pixel_values.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def draw_tokens(image: Image.Image, grid: tuple[int, int], kept: torch.Tensor, recycled: torch.Tensor | None = None) -> Image.Image:
    """Darken the cells of pruned tokens; outline cells that hold a recycled token."""
    rows, cols = grid
    width, height = image.size
    keep = np.zeros(rows * cols, dtype=bool)
    keep[kept.cpu().numpy()] = True
    cell_h, cell_w = height / rows, width / cols
    ys = (np.arange(height) / cell_h).astype(int).clip(0, rows - 1)
    xs = (np.arange(width) / cell_w).astype(int).clip(0, cols - 1)
    kept_pixels = keep.reshape(rows, cols)[ys][:, xs]
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    pixels[~kept_pixels] *= 1 - PRUNED_SHADE
    out = Image.fromarray(pixels.round().astype(np.uint8))
    if recycled is not None and recycled.numel():
        draw = ImageDraw.Draw(out)
        for index in recycled.cpu().tolist():
            r, c = divmod(index, cols)
            draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1], outline=RECYCLED, width=2)
    return out


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
            sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (left, top))
            for line, text in enumerate(wrap(caption, font, size)[:3]):
                draw.text((left, top + size + 2 + 12 * line), text, fill=(0, 0, 0), font=font)
    return sheet


def kept_tokens_picture(adapter, inputs: dict, processor, stats, path: str | None = None) -> Image.Image:
    """Every image of `inputs` as the model saw it (an image of several planes, LLaVA-NeXT/OneVision: each
    plane), with the kept tokens of `stats` (the prefill of these inputs) drawn over it, side by side; saved
    to `path` when given."""
    from .loading import pixel_normalisation

    kept = [indices for row in stats.kept for indices in row]
    recycled = [indices for row in stats.recycled for indices in row] or [None] * len(kept)
    grids, cells = adapter.image_grids(inputs), adapter.picture_cells(inputs)
    images = len({image for image, _ in cells})
    if len(kept) != images:
        raise ValueError(f"the stats hold {len(kept)} image(s) but the inputs {images}: draw right after the "
                         f"generate() call on these inputs")
    normalisation = pixel_normalisation(processor)
    views = [model_view(v, normalisation["pixel_mean"], normalisation["pixel_std"]) for v in adapter.pixel_views(inputs)]
    pictures = [image for image, _ in cells]  # an image drawn in several pictures: one per plane
    drawn, titles = [], []
    for number, (view, grid, (image, shown)) in enumerate(zip(views, grids, cells)):
        # the picture's cells that show a kept (recycled) token of its image
        on = torch.nonzero(torch.isin(shown, kept[image].to(shown.device))).flatten()
        merged = None if recycled[image] is None else torch.nonzero(torch.isin(shown, recycled[image].to(shown.device))).flatten()
        drawn.append((draw_tokens(view, grid, on, merged), f"kept {on.numel()} of {grid[0] * grid[1]}"))
        plane = f", plane {pictures[:number].count(image)}" if pictures.count(image) > 1 else ""
        titles.append(f"image {image}{plane}")
    picture = panel([drawn], titles)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        picture.save(path)
    return picture
