"""The synthetic VQA dataset: determinism, disjoint splits, vocabulary, unambiguous answers."""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from prunevlm.demo import dataset as ds
from prunevlm.demo.targets import dense_page


def digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.image.tobytes())
        for q in s.questions:
            h.update(f"{q.text}|{q.answer}|{q.qtype}|{q.refs}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def train300():
    return ds.generate("train", 300, seed=0)


def test_same_seed_same_bytes():
    assert digest(ds.generate("train", 5, seed=7)) == digest(ds.generate("train", 5, seed=7))
    assert digest(ds.generate("train", 5, seed=7)) != digest(ds.generate("train", 5, seed=8))


def test_generate_is_a_prefix_and_render_matches():
    a, b = ds.generate("val", 3), ds.generate("val", 5)
    assert digest(a) == digest(b[:3])
    assert digest([ds.render("val", 4)]) == digest(b[4:])


def test_splits_are_disjoint():
    seen = {}
    for split in ds.SPLITS:
        for i, s in enumerate(ds.generate(split, 40)):
            key = hashlib.sha256(s.image.tobytes()).hexdigest()
            assert key not in seen, f"{split}[{i}] repeats {seen[key]}"
            seen[key] = (split, i)


def test_images_and_objects(train300):
    for s in train300[:20]:
        assert s.image.size == (ds.IMAGE_SIZE, ds.IMAGE_SIZE) and s.image.mode == "RGB"
        assert 3 <= len(s.objects) <= ds.GRID * ds.GRID
        assert len({o.cell for o in s.objects}) == len(s.objects)
        mask = ds.object_mask(s)
        assert set(np.unique(mask)) == set(range(len(s.objects) + 1))
        for o in s.objects:
            assert o.box[2] - o.box[0] >= 30 and f"{o.colour} {o.shape}" in ds.caption(s)
    assert {s.background for s in train300} == {"plain", "gradient", "noise", "stripes"}
    assert any(o.text for s in train300 for o in s.objects)


def test_every_type_once_per_image_and_answers_in_vocabulary(train300):
    for s in train300:
        assert [q.qtype for q in s.questions] == list(ds.QTYPES)
        for q in s.questions:
            assert q.answer in ds.ANSWERS[q.qtype], q
            assert q.text.endswith("?") and q.text == q.text.lower()


def oracle(objects, question: str) -> str:
    """Answer a question from the objects alone, asserting that the object it names is unique."""

    def find(ref):
        parts = ref.split()
        hits = [o for o in objects if o.shape == parts[-1] and
                (len(parts) == 1 or o.colour == parts[0])]
        assert len(hits) == 1, f"'{ref}' names {len(hits)} objects in {question!r}"
        return hits[0]

    def unique(**kv):
        hits = [o for o in objects if all(getattr(o, k) == v for k, v in kv.items())]
        assert len(hits) == 1, f"{kv} matches {len(hits)} objects in {question!r}"
        return hits[0]

    plural = {v: k for k, v in ds.PLURALS.items()}
    position = {p: (r, c) for r, row in enumerate(ds.POSITIONS) for c, p in enumerate(row)}
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return unique(shape=m[1]).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return unique(colour=m[1]).shape
    if m := re.fullmatch(r"what shape is at the ([\w ]+)\?", question):
        return unique(cell=position[m[1]]).shape
    if m := re.fullmatch(r"what colour is the object at the ([\w ]+)\?", question):
        return unique(cell=position[m[1]]).colour
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o.colour == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.shape == plural[m[1]] for o in objects))
    if m := re.fullmatch(r"is the ([\w ]+?) (left of|right of|above|below) the ([\w ]+)\?",
                         question):
        (ra, ca), (rb, cb) = find(m[1]).cell, find(m[3]).cell
        truth = {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}
        return "yes" if truth[m[2]] else "no"
    if m := re.fullmatch(r"what (letter|number) is on the ([\w ]+)\?", question):
        o = find(m[2])
        assert o.text is not None and o.text.isdigit() == (m[1] == "number")
        return o.text
    if m := re.fullmatch(r"where is the ([\w ]+)\?", question):
        x0, y0, x1, y1 = find(m[1]).box  # the cell of the shape's centre, not its recorded cell
        cell = ds.IMAGE_SIZE / ds.GRID
        return ds.POSITIONS[int((y0 + y1) / 2 // cell)][int((x0 + x1) / 2 // cell)]
    raise AssertionError(f"question matches no template: {question!r}")


def test_questions_are_unambiguous_and_correct(train300):
    for s in train300:
        for q in s.questions:
            assert oracle(s.objects, q.text) == q.answer, (q, s.objects)


def test_redrawn_questions_are_correct_and_vary(train300):
    rng = np.random.default_rng(0)
    changed = 0
    for s in train300[:100]:
        redrawn = ds.redraw_questions(s, rng)
        assert [q.qtype for q in redrawn] == list(ds.QTYPES)
        for q in redrawn:
            assert oracle(s.objects, q.text) == q.answer, (q, s.objects)
        changed += sum(a.text != b.text for a, b in zip(redrawn, s.questions))
    assert changed > 200  # most questions differ from the image's own


def uniquely_named(objects) -> list[int]:
    """Objects whose shape, or colour and shape, no other object shares (restated, not `ds._refs`)."""
    return [i for i, o in enumerate(objects)
            if sum(p.shape == o.shape for p in objects) == 1
            or sum((p.shape, p.colour) == (o.shape, o.colour) for p in objects) == 1]


def test_where_questions_name_every_uniquely_named_object(train300):
    rng = np.random.default_rng(0)
    for s in train300[:100]:
        where = ds.where_questions(s, rng)
        assert sorted(q.refs[0] for q in where) == uniquely_named(s.objects)
        for q in where:
            assert q.qtype == "where" and oracle(s.objects, q.text) == q.answer, (q, s.objects)


def test_read_questions_ask_every_readable_named_object(train300):
    rng = np.random.default_rng(0)
    pages = [dense_page(0, i) for i in range(20)]  # the read stage's 16-character pages
    for s in train300[:100] + pages:
        read = ds.read_questions(s, rng)
        assert sorted(q.refs[0] for q in read) == [
            i for i in uniquely_named(s.objects) if s.objects[i].text is not None]
        for q in read:
            assert q.qtype == "text" and oracle(s.objects, q.text) == q.answer, (q, s.objects)


def test_refs_point_at_the_objects_asked_about(train300):
    for s in train300:
        q = {q.qtype: q for q in s.questions}
        assert len(q["relation"].refs) == 2
        assert s.objects[q["text"].refs[0]].text == q["text"].answer
        assert len(q["count"].refs) == int(q["count"].answer)
        assert (len(q["exists"].refs) > 0) == (q["exists"].answer == "yes")


def test_answers_are_balanced(train300):
    items = ds.flatten(train300)
    by_type = {t: Counter(it.answer for it in items if it.qtype == t) for t in ds.QTYPES}
    for t in ("exists", "relation"):
        assert 0.4 < by_type[t]["yes"] / 300 < 0.6
    assert set(by_type["count"]) == ds.ANSWERS["count"]
    assert max(by_type["count"].values()) / 300 < 0.25
    base = ds.majority_baseline(items)
    assert base["overall"] < 0.35 and set(base) == set(ds.QTYPES) | {"overall"}


def test_flatten_and_normalize():
    s = ds.generate("test", 2)
    items = ds.flatten(s)
    assert len(items) == 2 * len(ds.QTYPES)
    assert items[0].image is s[0].image and items[0].question == s[0].questions[0].text
    assert ds.normalize("  Yes. ") == "yes" and ds.normalize("Red?") == "red"


@pytest.mark.parametrize("call", [
    lambda: ds.generate("dev", 1),
    lambda: ds.generate("train", -1),
    lambda: ds.generate("train", 2.5),
    lambda: ds.render("train", 0, seed=-1),
])
def test_bad_input_is_refused(call):
    with pytest.raises(ValueError):
        call()


@pytest.fixture(scope="module")
def crowded200():
    return ds.generate("crowded-train", 200, seed=0)


def test_plain_positions_are_the_object_cells(train300):
    """`Obj.position` reads the box centre; in a plain scene that is the object's own grid cell."""
    for s in train300:
        for o in s.objects:
            assert o.position == ds.POSITIONS[o.cell[0]][o.cell[1]]


def test_crowded_scenes_hold_many_small_objects(crowded200):
    cell = ds.IMAGE_SIZE / ds.CROWD_GRID
    counts = [len(s.objects) for s in crowded200]
    assert min(counts) == ds.CROWD_OBJECTS[0] and max(counts) == ds.CROWD_OBJECTS[1]
    for s in crowded200[:40]:
        assert len({o.cell for o in s.objects}) == len(s.objects) and not any(o.text for o in s.objects)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 16 <= x1 - x0 == y1 - y0 <= 24 and 0 <= x0 < x1 <= ds.IMAGE_SIZE and 0 <= y0 < y1 <= ds.IMAGE_SIZE
            assert abs(x0 - o.cell[1] * cell) < cell and abs(y0 - o.cell[0] * cell) < cell
        for i, a in enumerate(s.objects):  # no two boxes overlap
            for b in s.objects[i + 1:]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        # each object lies on a few of the demo model's 16 px patches: it touches 2 to 9 and fills a fifth of
        # at most 4 (about 2 on average)
        cover = ds.patch_cover(ds.object_mask(s), 16, len(s.objects))
        touched, filled = (cover > 0).sum(0), (cover >= 0.2 * 16 * 16).sum(0)
        assert touched.min() >= 2 and touched.max() <= 9 and filled.max() <= 4, (touched, filled)
        assert 1 <= filled.mean() <= 3


def test_crowded_questions_are_correct_and_balanced(crowded200):
    rng = np.random.default_rng(0)
    for s in crowded200:
        assert [q.qtype for q in s.questions] == list(ds.CROWDED_QTYPES) and ds.is_crowded(s)
        for q in s.questions + ds.redraw_questions(s, rng) + ds.where_questions(s, rng):
            assert oracle(s.objects, q.text) == q.answer, (q, s.objects)
        relation = s.questions[2]
        (ra, ca), (rb, cb) = (s.objects[i].cell for i in relation.refs)
        assert max(abs(ra - rb), abs(ca - cb)) >= 2  # two grid cells apart: the answer is plain to see
    items = ds.flatten(crowded200)
    for qtype in ("exists", "relation"):
        yes = sum(it.answer == "yes" for it in items if it.qtype == qtype)
        assert 0.4 < yes / len(crowded200) < 0.6
    attributes = Counter(it.answer for it in items if it.qtype == "attribute")
    assert set(attributes) == set(ds.COLOURS) | set(ds.SHAPES)
    assert ds.majority_baseline(items)["overall"] < 0.4
    assert not any(ds.is_crowded(s) for s in ds.generate("test", 20))


def test_crowded_chats_hold_their_questions_and_where_turns(crowded200):
    from prunevlm.demo.chat import CROWD_WHERE, crowd_turns

    rng = np.random.default_rng(0)
    for s in crowded200[:30]:
        turns = crowd_turns(s, rng)
        where = [t for t in turns if t[0].startswith("where is")]
        assert len(where) == min(CROWD_WHERE, len(ds.where_questions(s, rng)))
        assert {(q.text, q.answer) for q in s.questions} <= set(turns)
        assert len(set(turns)) == len(turns)
