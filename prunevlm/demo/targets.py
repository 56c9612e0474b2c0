"""What the demo vision tower is trained to see: per-patch labels, CLS-token counts, and dense
character pages (images with a character on every shape), for ``train``'s vision and read stages."""

from __future__ import annotations

import numpy as np

from . import dataset

DENSE_STREAM = 7  # seeds dense pretraining pages as (seed, 7, index): no split uses 7


def patch_targets(sample: dataset.Sample, patch: int) -> np.ndarray:
    """[N, 4] per-patch labels (shape, colour, char, centre), 0 = background / none / no.

    A patch takes the shape and colour of the object covering most of it if that covers at
    least 20 % of it, a character if at least 10 pixels of that character fall inside it, and
    centre = 1 if an object's box centre lies in it (one patch per object, as in CenterNet)."""
    g = sample.image.size[0] // patch
    cover = dataset.patch_cover(dataset.object_mask(sample), patch, len(sample.objects))
    ink = dataset.patch_cover(dataset.text_mask(sample), patch, len(sample.objects))
    owner = np.where(cover.max(1) >= 0.2 * patch * patch, cover.argmax(1), -1)
    writer = np.where(ink.max(1) >= 10, ink.argmax(1), -1)
    table = np.zeros((len(sample.objects) + 1, 3), dtype=np.int64)  # last row: background
    centre = np.zeros(g * g, dtype=np.int64)
    for i, o in enumerate(sample.objects):
        char = 0 if o.text is None else dataset.CHARS.index(o.text) + 1
        table[i] = (dataset.SHAPES.index(o.shape) + 1, list(dataset.COLOURS).index(o.colour) + 1,
                    char)
        centre[((o.box[1] + o.box[3]) // 2 // patch) * g + (o.box[0] + o.box[2]) // 2 // patch] = 1
    return np.stack([table[owner, 0], table[owner, 1], table[writer, 2], centre], 1)


def dense_page(seed: int, index: int) -> dataset.Sample:
    """An image with a character on every shape, for the vision and read stages: a 4x4 grid of
    34-46 px shapes.

    Scenes hold about 2.5 characters each, too few to learn reading in a short CPU run; these
    pages hold 16. They come from their own seeded stream, never from a dataset split."""
    rng = np.random.default_rng([seed, DENSE_STREAM, index])
    cell = dataset.IMAGE_SIZE // 4
    objects = []
    for row in range(4):
        for col in range(4):
            size = int(rng.integers(34, 47))
            x0, y0 = (col * cell + int(rng.integers(0, cell - size + 1)),
                      row * cell + int(rng.integers(0, cell - size + 1)))
            objects.append(dataset.Obj(
                str(rng.choice(dataset.SHAPES)), str(rng.choice(list(dataset.COLOURS))),
                (x0, y0, x0 + size, y0 + size), (row, col), str(rng.choice(dataset.CHARS))))
    image, background = dataset.draw(rng, objects)
    return dataset.Sample(image, objects, [], background)


def count_targets(sample: dataset.Sample) -> np.ndarray:
    """Number of objects of each shape, then of each colour (-100, ignored, on dense pages)."""
    if not sample.questions:
        return np.full(len(dataset.SHAPES) + len(dataset.COLOURS), -100, dtype=np.int64)
    shapes = [sum(o.shape == s for o in sample.objects) for s in dataset.SHAPES]
    colours = [sum(o.colour == c for o in sample.objects) for c in dataset.COLOURS]
    return np.array(shapes + colours, dtype=np.int64)
