"""The demo model's training text: the (question, answer) turns of each image-text stage, their
ids and labels in LLaVA's conversation format, and right-padded batches of them."""

from __future__ import annotations

import numpy as np
import torch

from . import build, dataset

DRILL_ROUNDS = 3  # question sets per image in the drill stage
CROWD_WHERE = 6  # 'where is X?' turns per crowded scene in the crowd stage (of about 15 named objects)


def pad_right(seqs: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-padded ids, attention mask and labels (-100 where no loss is taken)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)], lab[i, :len(l)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(l), 1
    return ids, mask, lab


def supervised(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels of a chat, LLaVA's conversation format: the image in the first user turn,
    each answer followed by ``</s>``, and loss only on the answers and their ``</s>``."""
    ids, labels = [], []
    for i, (question, answer) in enumerate(turns):
        user = build.prompt(question) if i == 0 else f"USER: {question} ASSISTANT:"
        p = tokenizer(user.replace(build.IMAGE, build.IMAGE * build.IMAGE_TOKENS),
                      add_special_tokens=i == 0)["input_ids"]
        a = tokenizer(f"{answer} {build.EOS}", add_special_tokens=False)["input_ids"]
        ids += p + a
        labels += [-100] * len(p) + a
    return ids, labels


def chat_batch(tokenizer, chats: list[list[tuple[str, str]]]):
    """Right-padded ids, attention mask and labels of one ``supervised`` chat per image."""
    rows = [supervised(tokenizer, turns) for turns in chats]
    return pad_right([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id)


def shuffled(turns: list, rng: np.random.Generator) -> list:
    return [turns[i] for i in rng.permutation(len(turns))]


def caption_turns(sample, rng):
    return [(build.CAPTION_QUESTION, dataset.caption(sample))]


def chat_turns(sample, rng):
    """The caption request and every question of the image as one multi-turn chat in random
    order (LLaVA's instruction data mixes descriptions and short answers in conversations)."""
    turns = caption_turns(sample, rng) + [(q.text, q.answer) for q in sample.questions]
    return shuffled(turns, rng)


def answer_turns(sample, rng):
    """The image's questions in random order, then the caption request: no answer can be copied
    from a caption earlier in the chat, as none precedes a test question."""
    turns = [(q.text, q.answer) for q in sample.questions]
    return shuffled(turns, rng) + caption_turns(sample, rng)


def drill_turns(sample, rng):
    """``DRILL_ROUNDS`` sets of questions about the image (its own and redrawn ones, each
    question once) in random order, no caption: more answers per rendered image."""
    sets = [sample.questions] + [dataset.redraw_questions(sample, rng)
                                 for _ in range(DRILL_ROUNDS - 1)]
    turns = list(dict.fromkeys((q.text, q.answer) for qs in sets for q in qs))
    return shuffled(turns, rng)


def locate_turns(sample, rng):
    """The drill's turns plus 'where is X?' for each named object, shuffled together: the
    object-to-place step a relation question needs for both its objects."""
    turns = drill_turns(sample, rng) + [(q.text, q.answer)
                                        for q in dataset.where_questions(sample, rng)]
    return shuffled(turns, rng)


def read_turns(page, rng):
    """Every ``dataset.read_questions`` of a dense character page, in random order."""
    return shuffled([(q.text, q.answer) for q in dataset.read_questions(page, rng)], rng)


def crowd_turns(sample, rng):
    """A crowded scene's ``DRILL_ROUNDS`` question sets (the attribute question is the scene's own)
    plus 'where is X?' for ``CROWD_WHERE`` of its named objects, shuffled together."""
    where = dataset.where_questions(sample, rng)
    where = [where[i] for i in rng.permutation(len(where))[:CROWD_WHERE]]
    return shuffled(drill_turns(sample, rng) + [(q.text, q.answer) for q in where], rng)
