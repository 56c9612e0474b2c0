"""Synthetic visual question answering: seeded scenes of coloured shapes drawn with PIL.

Each image is a 192x192 scene: 3 to 8 shapes placed in distinct cells of a 3x3 grid (with
jitter), with random sizes and colours, on a plain, gradient, noisy or striped background.
Some shapes carry a letter or digit. Every image gets one question of each type:

=========  ==========================================  ==================================
qtype      example question                            answers
=========  ==========================================  ==================================
attribute  what colour is the triangle?                a colour or a shape
location   what shape is at the top left?              a colour or a shape
exists     is there a red circle?                      yes / no (balanced)
count      how many squares are there?                 0 to 5 (uniform)
relation   is the star left of the blue circle?        yes / no (balanced)
text       what letter is on the blue square?          a letter or digit from ``CHARS``
=========  ==========================================  ==================================

Objects are named by shape alone when the shape is unique in the image, otherwise by colour and
shape when that pair is unique, so every question has exactly one right answer.

The crowded splits (``crowded-train``, ``crowded-val`` and ``crowded``, the test) hold 12 to 30 small
shapes (16 to 24 px, so each covers one to four of the demo model's 16 px patches) in distinct cells of a
7x7 grid, without characters, and ask the ``CROWDED_QTYPES`` about one or two named objects: at 8 to 32
kept tokens a selection that ignores the question cannot keep every object.

Public API::

    generate(split, n_images, seed=0) -> list[Sample]   # split in SPLITS; deterministic
    render(split, index, seed=0) -> Sample              # one image; generate() is built on it
    redraw_questions(sample, rng) -> list[Question]     # more questions about the same scene
    where_questions(sample, rng) -> list[Question]      # 'where is the star?' (training only)
    read_questions(sample, rng) -> list[Question]       # the text question for every readable object
    draw(rng, objects) -> (PIL image, background kind)  # the painter render() uses
    flatten(samples) -> list[Item]                      # Item(image, question, answer, qtype)
    caption(sample) -> str                              # scene description (projector alignment)
    object_mask(sample) -> np.ndarray                   # [H, W] object index + 1, 0 = background
    text_mask(sample) -> np.ndarray                     # [H, W] same, for the drawn characters
    patch_cover(mask, patch, objects) -> np.ndarray     # [N, objects] pixels of each object per patch
    normalize(text) -> str                              # answer normalisation for exact match
    majority_baseline(items) -> dict[qtype, accuracy]   # accuracy of the most common answer

Image ``i`` of a split depends only on ``(seed, split, i)``: the generator is seeded with that
triple, so splits never share an image stream and ``generate(s, n)`` is a prefix of
``generate(s, n + k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InvalidSetting

SPLITS = {"train": 0, "val": 1, "test": 2, "crowded-train": 3, "crowded-val": 4, "crowded": 5}
CROWDED_SPLITS = ("crowded-train", "crowded-val", "crowded")
HELD_OUT = ("test", "crowded")  # never trained on; what `prunevlm eval` scores
IMAGE_SIZE = 192
GRID = 3
QTYPES = ("attribute", "location", "exists", "count", "relation", "text")
CROWDED_QTYPES = ("attribute", "exists", "relation")

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 190),
    "pink": (250, 120, 190),
}
CHARS = tuple("abdehkmrtx") + tuple("2345789")
POSITIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
MAX_COUNT = 5
ANSWERS = {
    "attribute": set(COLOURS) | set(SHAPES),
    "location": set(COLOURS) | set(SHAPES),
    "exists": {"yes", "no"},
    "count": {str(i) for i in range(MAX_COUNT + 1)},
    "relation": {"yes", "no"},
    "text": set(CHARS),
}

_SUPERSAMPLE = 2
_MIN_SIZE, _MAX_SIZE = 36, 58  # bounding-box side in pixels; a cell is 64 pixels
_TEXT_PROB = 0.45
CROWD_GRID = 7  # crowded scenes: cells of 27 px
CROWD_OBJECTS = (12, 30)
_CROWD_MIN_SIZE, _CROWD_MAX_SIZE = 16, 24


@dataclass(frozen=True)
class Obj:
    """One shape: ``box`` is (x0, y0, x1, y1) in pixels, ``cell`` is (row, col) in the grid."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]
    cell: tuple[int, int]
    text: str | None = None

    @property
    def position(self) -> str:
        """The 3x3 region holding the box centre (in a plain scene, the object's own cell)."""
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return POSITIONS[int(cy * GRID / IMAGE_SIZE)][int(cx * GRID / IMAGE_SIZE)]


@dataclass(frozen=True)
class Question:
    """``refs`` are the indices (into ``Sample.objects``) of the objects the question is about."""

    text: str
    answer: str
    qtype: str
    refs: tuple[int, ...] = ()


@dataclass
class Sample:
    image: Image.Image
    objects: list[Obj]
    questions: list[Question] = field(default_factory=list)
    background: str = "plain"


class Item(NamedTuple):
    image: Image.Image
    question: str
    answer: str
    qtype: str


def generate(split: str, n_images: int, seed: int = 0) -> list[Sample]:
    """``n_images`` samples of ``split``, each with one question per type in ``QTYPES`` (in
    ``CROWDED_QTYPES`` for the crowded splits)."""
    if not isinstance(n_images, int) or n_images < 0:
        raise InvalidSetting(f"n_images must be a non-negative int, got {n_images!r}")
    return [render(split, i, seed) for i in range(n_images)]


def render(split: str, index: int, seed: int = 0) -> Sample:
    """Image ``index`` of ``split``: a pure function of ``(seed, split, index)``."""
    if split not in SPLITS:
        raise InvalidSetting(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if index < 0 or seed < 0:
        raise InvalidSetting(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    crowded = split in CROWDED_SPLITS
    while True:  # rejection: redraw until every question type has an unambiguous question
        objects, own = _crowded_scene(rng) if crowded else _scene(rng)
        questions = (_crowded_questions if crowded else _questions)(rng, objects, own)
        if questions is not None:
            break
    image, background = draw(rng, objects)
    return Sample(image, objects, questions, background)


def is_crowded(sample: Sample) -> bool:
    return sample.questions[0].qtype == CROWDED_QTYPES[0] and len(sample.questions) == len(CROWDED_QTYPES)


def redraw_questions(sample: Sample, rng: np.random.Generator) -> list[Question]:
    """Another set of questions, one per type, about the same scene (the question the scene was
    built around, count in a plain scene and attribute in a crowded one, is the scene's own).
    For training only."""
    if is_crowded(sample):
        return _crowded_questions(rng, sample.objects, sample.questions[0])
    return _questions(rng, sample.objects, sample.questions[QTYPES.index("count")])


def where_questions(sample: Sample, rng: np.random.Generator) -> list[Question]:
    """'where is the star?' -> 'top left' for every uniquely named object: the object-to-place
    reading a relation question needs for both its objects. A training-only type ("where"); the
    demo tokenizer's vocabulary comes from the six test types, so it reads 'where' as <unk>."""
    return [Question(f"where is the {names[int(rng.integers(len(names)))]}?",
                     sample.objects[i].position, "where", (i,))
            for i, names in _refs(sample.objects).items()]


def read_questions(sample: Sample, rng: np.random.Generator) -> list[Question]:
    """'what letter is on the star?' for every uniquely named object with a character: the test's
    text question for each readable object (training pages with more characters than a scene)."""
    return [_text_question(sample.objects, i, names[int(rng.integers(len(names)))])
            for i, names in _refs(sample.objects).items() if sample.objects[i].text is not None]


def flatten(samples: list[Sample]) -> list[Item]:
    """One ``Item(image, question, answer, qtype)`` per question."""
    return [Item(s.image, q.text, q.answer, q.qtype) for s in samples for q in s.questions]


def caption(sample: Sample) -> str:
    """Describe every object in reading order, e.g. 'a red circle with the letter k at top left'."""
    parts = []
    for o in sorted(sample.objects, key=lambda o: o.cell):
        text = ""
        if o.text is not None:
            text = f" with the {'number' if o.text.isdigit() else 'letter'} {o.text}"
        parts.append(f"{_article(o.colour)} {o.colour} {o.shape}{text} at {o.position}")
    return " , ".join(parts) + " ."


def object_mask(sample: Sample) -> np.ndarray:
    """uint8 [H, W] map: 0 for background, ``i + 1`` where object ``i`` is drawn."""
    mask = Image.new("L", sample.image.size, 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(sample.objects):
        _shape(draw, o.shape, o.box, i + 1)
    return np.asarray(mask)


def text_mask(sample: Sample) -> np.ndarray:
    """uint8 [H, W] map: ``i + 1`` where the character of object ``i`` is drawn, else 0."""
    big = Image.new("L", (IMAGE_SIZE * _SUPERSAMPLE,) * 2, 0)
    draw = ImageDraw.Draw(big)
    for i, o in enumerate(sample.objects):
        if o.text is not None:
            _label(draw, o, tuple(v * _SUPERSAMPLE for v in o.box), i + 1)
    return np.asarray(big.resize(sample.image.size, Image.Resampling.NEAREST))


def patch_cover(mask: np.ndarray, patch: int, objects: int) -> np.ndarray:
    """[N, objects]: how many pixels of each patch (row-major, the ViT token order) hold mask value
    ``i + 1``, for each object ``i`` of an ``object_mask`` or ``text_mask``."""
    g = mask.shape[0] // patch
    pixels = mask.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    return np.stack([(pixels == i + 1).sum(1) for i in range(objects)], 1)


def normalize(text: str) -> str:
    """Lower-case, strip punctuation and surrounding space: the exact-match form of an answer."""
    return " ".join(text.lower().replace("?", " ").replace(".", " ").replace(",", " ").split())


def majority_baseline(items: list[Item]) -> dict[str, float]:
    """Per-type accuracy of always answering that type's most common answer (and 'overall')."""
    by_type: dict[str, list[str]] = {}
    for it in items:
        by_type.setdefault(it.qtype, []).append(it.answer)
    out = {}
    for qtype, answers in by_type.items():
        out[qtype] = max(answers.count(a) for a in set(answers)) / len(answers)
    total = sum(len(a) for a in by_type.values())
    out["overall"] = sum(out[t] * len(a) for t, a in by_type.items()) / max(total, 1)
    return out


# --------------------------------------------------------------------------- scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scene(rng: np.random.Generator) -> tuple[list[Obj], Question]:
    """Objects for one image, built around a count target drawn uniformly from 0..MAX_COUNT."""
    target = int(rng.integers(0, MAX_COUNT + 1))
    by_shape = rng.random() < 0.5
    key = str(rng.choice(SHAPES if by_shape else list(COLOURS)))
    n = int(rng.integers(max(3, target + 1), GRID * GRID))  # 3..8 objects
    cells = [(int(c) // GRID, int(c) % GRID) for c in rng.permutation(GRID * GRID)[:n]]
    cell_px = IMAGE_SIZE // GRID
    objects = []
    for i, (row, col) in enumerate(cells):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(list(COLOURS)))
        if by_shape:
            others = [s for s in SHAPES if s != key]
            shape = key if i < target else str(rng.choice(others))
        else:
            others = [c for c in COLOURS if c != key]
            colour = key if i < target else str(rng.choice(others))
        size = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
        x0 = col * cell_px + int(rng.integers(2, cell_px - size - 1))
        y0 = row * cell_px + int(rng.integers(2, cell_px - size - 1))
        text = str(rng.choice(CHARS)) if rng.random() < _TEXT_PROB else None
        objects.append(Obj(shape, colour, (x0, y0, x0 + size, y0 + size), (row, col), text))
    noun = PLURALS[key] if by_shape else f"{key} objects"
    text = f"how many {noun} are there?"
    return objects, Question(text, str(target), "count", tuple(range(target)))


def _crowded_scene(rng: np.random.Generator) -> tuple[list[Obj], Question]:
    """12 to 30 small shapes in distinct cells of a ``CROWD_GRID`` grid, built around an attribute
    question: one object (random cell) is the only one of its shape (asked its colour) or of its
    colour (asked its shape)."""
    n = int(rng.integers(CROWD_OBJECTS[0], CROWD_OBJECTS[1] + 1))
    cells = [(int(c) // CROWD_GRID, int(c) % CROWD_GRID) for c in rng.permutation(CROWD_GRID ** 2)[:n]]
    by_shape = rng.random() < 0.5
    key = str(rng.choice(SHAPES if by_shape else list(COLOURS)))
    cell_px = IMAGE_SIZE / CROWD_GRID
    objects = []
    for i, (row, col) in enumerate(cells):
        shapes = [key] if by_shape and i == 0 else [s for s in SHAPES if not by_shape or s != key]
        colours = [key] if not by_shape and i == 0 else [c for c in COLOURS if by_shape or c != key]
        size = int(rng.integers(_CROWD_MIN_SIZE, _CROWD_MAX_SIZE + 1))
        x0 = int(col * cell_px) + int(rng.integers(0, int(cell_px) - size + 1))
        y0 = int(row * cell_px) + int(rng.integers(0, int(cell_px) - size + 1))
        objects.append(Obj(str(rng.choice(shapes)), str(rng.choice(colours)),
                           (x0, y0, x0 + size, y0 + size), (row, col)))
    o = objects[0]
    if by_shape:
        return objects, Question(f"what colour is the {o.shape}?", o.colour, "attribute", (0,))
    return objects, Question(f"what shape is the {o.colour} object?", o.shape, "attribute", (0,))


def _refs(objects: list[Obj]) -> dict[int, list[str]]:
    """Unambiguous referring expressions ('the star', 'the red star') for each object index."""
    out: dict[int, list[str]] = {}
    for i, o in enumerate(objects):
        same_shape = [p for p in objects if p.shape == o.shape]
        names = []
        if len(same_shape) == 1:
            names.append(o.shape)
        if sum(p.colour == o.colour for p in same_shape) == 1:
            names.append(f"{o.colour} {o.shape}")
        if names:
            out[i] = names
    return out


def _questions(rng, objects: list[Obj], count_q: Question) -> list[Question] | None:
    """One question per type, or None when the scene cannot support one of them."""
    refs = _refs(objects)
    qs = {"count": count_q}

    def pick(seq):
        return _pick(rng, seq)

    # attribute: colour of a uniquely-shaped object, or shape of a uniquely-coloured one
    options = [("colour", i) for i, o in enumerate(objects)
               if sum(p.shape == o.shape for p in objects) == 1]
    options += [("shape", i) for i, o in enumerate(objects)
                if sum(p.colour == o.colour for p in objects) == 1]
    if not options:
        return None
    asked, i = pick(options)
    o = objects[i]
    if asked == "colour":
        qs["attribute"] = Question(f"what colour is the {o.shape}?", o.colour, "attribute", (i,))
    else:
        text = f"what shape is the {o.colour} object?"
        qs["attribute"] = Question(text, o.shape, "attribute", (i,))

    # location: what is in a given (occupied) cell
    i = int(rng.integers(len(objects)))
    o = objects[i]
    if rng.random() < 0.5:
        text, answer = f"what shape is at the {o.position}?", o.shape
    else:
        text, answer = f"what colour is the object at the {o.position}?", o.colour
    qs["location"] = Question(text, answer, "location", (i,))

    qs["exists"] = _exists_question(rng, objects)

    qs["relation"] = _relation_question(rng, objects, refs)
    if qs["relation"] is None:
        return None

    # text: the character on a uniquely named object
    readable = [i for i in refs if objects[i].text is not None]
    if not readable:
        return None
    i = pick(readable)
    qs["text"] = _text_question(objects, i, pick(refs[i]))
    return [qs[t] for t in QTYPES]


def _crowded_questions(rng, objects: list[Obj], attribute_q: Question) -> list[Question] | None:
    """The scene's attribute question, an existence and a relation question (its two objects at
    least two grid columns or rows apart), or None when no relation can be asked."""
    relation = _relation_question(rng, objects, _refs(objects), gap=2)
    if relation is None:
        return None
    return [attribute_q, _exists_question(rng, objects), relation]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _exists_question(rng, objects: list[Obj]) -> Question:
    """Yes for a present (colour, shape); no for an absent one, often a near miss."""
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = _pick(rng, near if near and rng.random() < 0.7 else absent)
        answer = "no"
    hits = tuple(i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape))
    return Question(f"is there {_article(colour)} {colour} {shape}?", answer, "exists", hits)


def _relation_question(rng, objects: list[Obj], refs: dict[int, list[str]], gap: int = 1) -> Question | None:
    """Two uniquely named objects at least ``gap`` grid columns (left/right) or rows (above/below)
    apart, or None when no such pair exists."""
    pairs = []
    for i in refs:
        for j in refs:
            a, b = objects[i].cell, objects[j].cell
            if i != j and a[1] + gap <= b[1]:
                pairs.append((i, j, "left of", "right of"))
            if i != j and a[0] + gap <= b[0]:
                pairs.append((i, j, "above", "below"))
    if not pairs:
        return None
    i, j, true_rel, false_rel = _pick(rng, pairs)
    if rng.random() < 0.5:  # swap the order so both relation words appear with both answers
        i, j, true_rel, false_rel = j, i, false_rel, true_rel
    answer = "yes" if rng.random() < 0.5 else "no"
    rel = true_rel if answer == "yes" else false_rel
    text = f"is the {_pick(rng, refs[i])} {rel} the {_pick(rng, refs[j])}?"
    return Question(text, answer, "relation", (i, j))


def _text_question(objects: list[Obj], i: int, name: str) -> Question:
    """'what letter (or number) is on the {name}?' about object ``i``, named ``name``."""
    o = objects[i]
    return Question(f"what {'number' if o.text.isdigit() else 'letter'} is on the {name}?", o.text, "text", (i,))


# --------------------------------------------------------------------------- drawing


def draw(rng: np.random.Generator, objects: list[Obj]) -> tuple[Image.Image, str]:
    """Draw ``objects`` on a random background; returns the image and the background kind.

    Shapes are drawn at twice the size and downsized, for smooth edges."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    kind = str(rng.choice(["plain", "gradient", "noise", "stripes"]))
    img = Image.fromarray(_background(rng, kind, IMAGE_SIZE))
    img = img.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for o in objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255))
        box = tuple(v * _SUPERSAMPLE for v in o.box)
        _shape(draw, o.shape, box, fill)
        if o.text is not None:
            luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
            _label(draw, o, box, (0, 0, 0) if luminance > 140 else (255, 255, 255))
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if rng.random() < 0.5:  # light sensor-like noise over the whole image
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 3.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return img, kind


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, light or dark, so that the saturated shapes stand out."""
    grey = rng.uniform(40, 225)
    tint = rng.uniform(-25, 25, size=3)
    return np.clip(grey + tint, 0, 255)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = _muted(rng)
    arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        other = _muted(rng)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
        t = (xs * math.cos(angle) + ys * math.sin(angle))
        t = (t - t.min()) / (t.max() - t.min())
        arr = base + t[..., None] * (other - base)
    elif kind == "noise":
        arr = arr + rng.normal(0, rng.uniform(6, 14), (size, size, 1))
    elif kind == "stripes":
        period = rng.uniform(10, 30)
        angle = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:size, 0:size]
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        arr = arr + rng.uniform(6, 14) * np.sign(np.sin(2 * math.pi * phase))[..., None]
    return np.clip(arr, 0, 255).astype(np.uint8)


def _shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        m = r * 0.1
        draw.rectangle((x0 + m, y0 + m, x1 - m, y1 - m), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, rotation=30, fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + r * 0.08 + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _label(draw: ImageDraw.ImageDraw, o: Obj, box, ink) -> None:
    """The object's character in colour ``ink``, centred on the object's body."""
    x0, y0, x1, y1 = box
    size = x1 - x0
    font = ImageFont.load_default(size=max(8, int(size * 0.6)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if o.shape == "triangle":
        cy = y0 + size * 0.64
    stroke = max(1, size // 40)
    draw.text((cx, cy), o.text.upper(), font=font, fill=ink, anchor="mm",
              stroke_width=stroke, stroke_fill=ink)
