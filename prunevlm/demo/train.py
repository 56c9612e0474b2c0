"""Train the demo VLM on the synthetic train splits, LLaVA-style.

    python -m prunevlm.demo.train --out DIR [--init V1] [--seed S] [--threads N] [--scale F] [--log JSON]
        [--checkpoints DIR]

The shipped model is version 2: ``--init`` takes version 1's saved weights (``make retrain-demo`` extracts them
from git) and runs only LLaVA's two stages again, now with the crowded scenes:

1.  caption: only the projector learns, to caption plain and crowded scenes (LLM and tower frozen): what
    aligns projected image tokens with word embeddings in real LLaVA models.
2.  crowd:   everything learns (the tower at TOWER_LR_SCALE of the rate): plain scenes' locate chats, crowded
    scenes' questions and 'where is X?' turns, and a dense page's reading questions with the read stage's
    per-patch character loss.

Without ``--init``, version 1's nine stages run first, from scratch:

0a. vision: the CLIP tower is pretrained (nothing pretrained exists here) on scenes and, for half
    of each batch, dense character pages, to label every patch with the shape, colour and
    character of the object covering it and whether an object's centre lies in it, and the CLS
    token with the number of objects of each shape and colour.
0b. text:   the Llama model is pretrained as a language model on captions and question/answer text.
1.  align:  only the projector learns, to caption images (vision tower and LLM frozen).
2.  instruct: projector and LLM learn multi-turn chats, the caption request and the image's six
    questions in random order (vision tower frozen, as LLaVA-1.5).
3.  answer: the same chats with the caption request always last. In stage 2 about half the
    answers could be read off a caption earlier in the chat, which no test prompt has; here every
    answer must come from the image.
4.  drill: only questions, ``chat.DRILL_ROUNDS`` sets of them per image (its own and redrawn ones,
    about 13 turns), everything trainable, the vision tower at TOWER_LR_SCALE of the rate (as
    LLaVA-NeXT and OneVision unfreeze it): more answers per rendered image, where stage 3 spent
    most of its loss on captions.
5.  drill2: the drill continued.
6.  locate: the drill's turns plus 'where is the star?' -> 'top left' for every uniquely named
    object (a training-only question): the step a relation question needs for both its objects.
7.  read:   the locate chats plus dense character pages asked the character on every named shape,
    with a per-patch character loss on the projected image tokens, everything at the full rate.

Then the model is saved as a Hugging Face folder, reloaded, and evaluated on the test and crowded
splits; a JSON summary (loss curves, accuracy, time, versions) is written to ``--log``.
Every stage draws fresh train images from deterministic streams; held-out images are never seen.
docs/demo.md gives each stage's results and the measurements behind them. No loss refers to a pruning
method or to the similarity of image tokens and words.

The training targets are in ``targets``, the chat turns and batches in ``chat``, and the parts of
the LLaVA forward that the stages call one by one in ``llava_forward``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import accuracy, build, dataset
from .chat import (answer_turns, caption_turns, chat_batch, chat_turns, crowd_turns, drill_turns,
                   locate_turns, pad_right, read_turns)
from .llava_forward import image_embeds, pixels, projected_features
from .targets import count_targets, dense_page, patch_targets

# (steps, batch) per stage; batch counts texts in the text stage, images in the vision stage (half
# of them dense pages), scene images in the others (the read stage adds PAGES_PER_SCENE dense pages
# per scene).
STAGES = {"vision": (3000, 32), "text": (300, 32), "align": (400, 16), "instruct": (1500, 16),
          "answer": (2400, 16), "drill": (4000, 8), "drill2": (3000, 8), "locate": (4000, 8),
          "read": (2000, 4)}
LR = {"vision": 1e-3, "text": 1e-3, "align": 1e-3, "instruct": 1e-3, "answer": 5e-4,
      "drill": 5e-4, "drill2": 5e-4, "locate": 5e-4, "read": 5e-4, "caption": 5e-4, "crowd": 5e-4}
# Version 2, from the v1 weights: LLaVA's two stages again, with the crowded scenes (docs/demo.md,
# "Version 2"). caption: only the projector, captions of plain and crowded scenes (half each);
# crowd: everything, CROWD_MIX images a step (plain scenes' locate chats, crowded scenes' chats and a
# dense page's reading questions, with read's per-patch character loss).
RETRAIN = {"caption": (300, 16), "crowd": (2000, 8)}
CROWD_MIX = {"plain": 3, "crowded": 4, "pages": 1}
V1_TRAIN_IMAGES = 262_300  # the plain train images v1 used (benchmarks/results/demo_train_v1.json)
RETRAIN_PAGES = 2 * 10 ** 6  # version 2's dense pages start here, after the read stage's
TOWER_LR_SCALE = 0.2  # an unfrozen vision tower learns 5x slower (LLaVA-OneVision: 2e-6 vs 1e-5)
MAX_OBJECTS = dataset.GRID * dataset.GRID
VAL_IMAGES, TEST_IMAGES = 50, 200
READ_PAGES = 10 ** 6  # the read stage's dense pages start here, after stage 0a's
PAGES_PER_SCENE = 2  # dense character pages per scene image in the read stage


class Stream:
    """Images of a train split in order: each stage continues where the previous one stopped."""

    def __init__(self, seed: int, split: str = "train", start: int = 0):
        self.seed, self.split, self.next = seed, split, start

    def take(self, n: int) -> list[dataset.Sample]:
        out = [dataset.render(self.split, self.next + i, self.seed) for i in range(n)]
        self.next += n
        return out


def schedule(optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the peak rate."""
    warm = max(1, steps // 20)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_stage(name, params, steps, loss_fn, probe=None, probe_every=250, log_every=50,
              slow=()) -> dict:
    """Optimise ``params`` with AdamW for ``steps`` calls of ``loss_fn(step)``; those also in
    ``slow`` at ``TOWER_LR_SCALE`` times the stage's rate.

    Returns a loss summary; ``probe()`` (held-out metrics) runs every ``probe_every`` steps."""
    params = [p for p in params if p.requires_grad]
    slow_ids = {id(p) for p in slow}
    groups = [{"params": [p for p in params if id(p) not in slow_ids]},
              {"params": [p for p in params if id(p) in slow_ids],
               "lr": LR[name] * TOWER_LR_SCALE}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=LR[name], weight_decay=0.05,
                            betas=(0.9, 0.98))
    sched = schedule(opt, steps)
    losses, probes, t0 = [], [], time.time()
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            window = np.mean(losses[-log_every:])
            print(f"[{name}] step {step + 1}/{steps} loss {window:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if probe is not None and ((step + 1) % probe_every == 0 or step + 1 == steps):
            probes.append({"step": step + 1, **probe()})
            print(f"[{name}] step {step + 1} probe {probes[-1]}", flush=True)
    chunk = max(1, steps // 20)
    curve = [round(float(np.mean(losses[i:i + chunk])), 4) for i in range(0, steps, chunk)]
    out = {"steps": steps, "seconds": round(time.time() - t0, 1), "loss_first": curve[0],
           "loss_last": curve[-1], "loss_curve": curve}
    return out | ({"probes": probes} if probes else {})


# --------------------------------------------------------------------------- stage 0a: vision


class VisionHeads(nn.Module):
    """Pretraining heads, thrown away afterwards: per-patch labels and CLS-token counts."""

    KINDS = ("shape", "colour", "char", "centre", "counts")

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = (len(dataset.SHAPES) + 1, len(dataset.COLOURS) + 1, len(dataset.CHARS) + 1, 2)
        self.norm = nn.LayerNorm(hidden)
        self.patch = nn.Linear(hidden, sum(self.sizes))
        self.n_counts = len(dataset.SHAPES) + len(dataset.COLOURS)
        self.count = nn.Linear(hidden, self.n_counts * (MAX_OBJECTS + 1))

    def forward(self, out, patch_y: torch.Tensor, count_y: torch.Tensor):
        """Mean cross-entropy over the label kinds, and per-kind accuracy on the labelled
        patches (label > 0: no credit for predicting background) and on the counts."""
        logits = self.patch(self.norm(out.last_hidden_state[:, 1:]))
        counts = self.count(out.pooler_output).view(-1, self.n_counts, MAX_OBJECTS + 1)
        pairs = list(zip(logits.split(self.sizes, dim=-1), patch_y.unbind(-1))) + [(counts, count_y)]
        losses, acc = [], {}
        for kind, (pred, y) in zip(self.KINDS, pairs):
            losses.append(nn.functional.cross_entropy(pred.flatten(0, -2), y.flatten()))
            keep = y > 0 if kind != "counts" else y >= 0
            acc[kind] = round((pred.argmax(-1) == y)[keep].float().mean().item(), 4)
        return sum(losses) / len(losses), acc


def init_vision(tower, seed: int) -> None:
    """Locality-friendly start for a ViT trained from scratch on little data.

    2-D sine-cosine position embeddings (as MAE) and mimetic attention initialisation
    (Trockman & Kolter, 2023: W_q W_k^T ~ 0.7 Z + 0.7 I per head, W_o W_v ~ 0.4 Z - 0.4 I), so
    that patches start by attending to nearby, similar patches. Both stay trainable."""
    g = tower.config.image_size // tower.config.patch_size
    d, heads = tower.config.hidden_size, tower.config.num_attention_heads
    dh, quarter = d // heads, d // 4
    omega = 100.0 ** (-torch.arange(quarter) / quarter)  # base 100 suits a 12-wide grid
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    angles = [p.flatten()[:, None].float() * omega for p in (ys, xs)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)
    gen = torch.Generator().manual_seed(seed)

    def factors(alpha, beta):  # U, V with U @ V.T = alpha Z + beta I, Z ~ N(0, 1/d)
        u, sv, vh = torch.linalg.svd(alpha * torch.randn(d, d, generator=gen) / d ** 0.5
                                     + beta * torch.eye(d))
        return u * sv.sqrt(), vh.T * sv.sqrt()

    with torch.no_grad():
        tower.embeddings.position_embedding.weight[0] = 0  # CLS
        tower.embeddings.position_embedding.weight[1:] = table
        for layer in tower.encoder.layers:
            att = layer.self_attn
            for h in range(heads):
                q, k = factors(0.7, 0.7)
                att.q_proj.weight[h * dh:(h + 1) * dh] = q[:, :dh].T
                att.k_proj.weight[h * dh:(h + 1) * dh] = k[:, :dh].T
            o, v = factors(0.4, -0.4)
            att.out_proj.weight.copy_(o)
            att.v_proj.weight.copy_(v.T)


def pretrain_vision(model, processor, stream: Stream, steps: int, batch: int) -> dict:
    """Stage 0a: the tower learns per-patch scene labels and, on its CLS token, counts."""
    tower = model.model.vision_tower
    init_vision(tower, stream.seed)
    heads = VisionHeads(tower.config.hidden_size)
    patch = tower.config.patch_size

    def tensors(samples):
        y = torch.from_numpy(np.stack([patch_targets(s, patch) for s in samples]))
        c = torch.from_numpy(np.stack([count_targets(s) for s in samples]))
        return pixels(processor, samples), y, c

    val = tensors(dataset.generate("val", VAL_IMAGES, stream.seed))

    @torch.no_grad()
    def probe():
        tower.eval()
        acc = heads(tower(val[0]), *val[1:])[1]
        tower.train()
        return acc

    def loss_fn(step):  # half scenes, half dense character pages
        pages = [dense_page(stream.seed, step * batch + i) for i in range(batch - batch // 2)]
        pix, y, c = tensors(stream.take(batch // 2) + pages)
        return heads(tower(pix), y, c)[0]

    tower.train()
    summary = run_stage("vision", list(tower.parameters()) + list(heads.parameters()), steps,
                        loss_fn, probe)
    tower.eval()
    return summary


# --------------------------------------------------------------------------- language stages


def pretrain_text(model, tokenizer, stream: Stream, steps: int, batch: int) -> dict:
    """Stage 0b: plain next-token prediction on captions and 'question answer' lines."""
    def loss_fn(step):
        texts = []
        while len(texts) < batch:
            s = stream.take(1)[0]
            texts.append(dataset.caption(s))
            texts += [f"{q.text} {q.answer}" for q in s.questions]
        seqs = [tokenizer(f"{t} {build.EOS}")["input_ids"] for t in texts[:batch]]
        ids, mask, lab = pad_right(seqs, seqs, tokenizer.pad_token_id)
        lab[mask == 0] = -100
        return model(input_ids=ids, attention_mask=mask, labels=lab).loss

    return run_stage("text", model.parameters(), steps, loss_fn)


def image_text_stage(name, model, processor, stream, steps, batch, turns_of, probe=None) -> dict:
    """Stages 1 to 6 (those in ``TURNS``): one chat per image, ``turns_of(sample, rng)`` its
    (question, answer) turns."""
    tok = processor.tokenizer

    def loss_fn(step):
        samples = stream.take(batch)
        rngs = [np.random.default_rng([stream.seed, step, k]) for k in range(batch)]
        ids, mask, lab = chat_batch(tok, [turns_of(s, rng) for s, rng in zip(samples, rngs)])
        embeds = image_embeds(model, ids, projected_features(model, pixels(processor, samples)))
        return model(inputs_embeds=embeds, attention_mask=mask, labels=lab).loss

    return run_stage(name, model.parameters(), steps, loss_fn, probe,
                     slow=list(model.model.vision_tower.parameters()))


def read_stage(model, processor, stream, steps, batch, probe=None) -> dict:
    """The locate stage's chats plus ``PAGES_PER_SCENE`` dense character pages per scene, each
    asked the character on every uniquely named shape (``dataset.read_questions``), and the vision
    stage's per-patch character loss on the image tokens the LLM receives; the tower learns at the
    full rate. The auxiliary head is thrown away afterwards.

    The character loss is on the projected tokens, not on the tower's layer -2, so that the
    projector passes the characters on to the LLM; docs/demo.md gives the reading-probe
    (benchmarks/reading_probe.py) results behind that choice."""
    tok = processor.tokenizer
    width = model.config.text_config.hidden_size
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(dataset.CHARS) + 1))
    patch = model.config.vision_config.patch_size

    def loss_fn(step):
        scenes = stream.take(batch)
        pages = [dense_page(stream.seed, READ_PAGES + (step * batch + i) * PAGES_PER_SCENE + j)
                 for i in range(batch) for j in range(PAGES_PER_SCENE)]
        rngs = [np.random.default_rng([stream.seed, step, k]) for k in range(len(scenes + pages))]
        turns = [locate_turns(s, rng) for s, rng in zip(scenes, rngs)]
        turns += [read_turns(p, rng) for p, rng in zip(pages, rngs[batch:])]
        ids, mask, lab = chat_batch(tok, turns)
        tokens = projected_features(model, pixels(processor, scenes + pages))
        chars = torch.from_numpy(np.stack([patch_targets(s, patch)[:, 2] for s in scenes + pages]))
        aux = nn.functional.cross_entropy(head(tokens).flatten(0, 1), chars.flatten())
        embeds = image_embeds(model, ids, tokens)
        return model(inputs_embeds=embeds, attention_mask=mask, labels=lab).loss + aux

    return run_stage("read", list(model.parameters()) + list(head.parameters()), steps, loss_fn, probe)


# --------------------------------------------------------------------------- version 2


def mixed_stage(name, model, processor, seed, parts, steps, probe=None, char_loss=False) -> dict:
    """One chat per image, the images drawn from several sources each step: ``parts`` lists
    ``(take, n, turns_of)``, ``take(step, n)`` giving ``n`` samples and ``turns_of(sample, rng)``
    each one's (question, answer) turns. With ``char_loss``, read_stage's per-patch character loss
    on the projected image tokens is added (its head thrown away afterwards). A tower that learns
    does so at ``TOWER_LR_SCALE`` of the rate."""
    tok = processor.tokenizer
    width = model.config.text_config.hidden_size
    with torch.random.fork_rng():  # seeded here, so a run resumed from a checkpoint starts it alike
        torch.manual_seed(seed)
        head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(dataset.CHARS) + 1))
    patch = model.config.vision_config.patch_size

    def loss_fn(step):
        samples, chats = [], []
        for take, n, turns_of in parts:
            got = take(step, n)
            rngs = [np.random.default_rng([seed, step, len(samples) + k]) for k in range(n)]
            chats += [turns_of(s, rng) for s, rng in zip(got, rngs)]
            samples += got
        ids, mask, lab = chat_batch(tok, chats)
        tokens = projected_features(model, pixels(processor, samples))
        loss = model(inputs_embeds=image_embeds(model, ids, tokens), attention_mask=mask, labels=lab).loss
        if char_loss:
            chars = torch.from_numpy(np.stack([patch_targets(s, patch)[:, 2] for s in samples]))
            loss = loss + nn.functional.cross_entropy(head(tokens).flatten(0, 1), chars.flatten())
        return loss

    params = list(model.parameters()) + (list(head.parameters()) if char_loss else [])
    return run_stage(name, params, steps, loss_fn, probe, slow=list(model.model.vision_tower.parameters()))


# Which parts learn in each stage (everything else is frozen).
LLM = ("multi_modal_projector", "language_model", "lm_head")
EVERYTHING = ("vision_tower",) + LLM
TRAINABLE = {"vision": ("vision_tower",), "text": ("language_model", "lm_head"),
             "align": ("multi_modal_projector",), "instruct": LLM, "answer": LLM,
             "drill": EVERYTHING, "drill2": EVERYTHING, "locate": EVERYTHING, "read": EVERYTHING,
             "caption": ("multi_modal_projector",), "crowd": EVERYTHING}
# The chat turns of each image-text stage (drill2 continues the drill).
TURNS = {"align": caption_turns, "instruct": chat_turns, "answer": answer_turns, "drill": drill_turns,
         "drill2": drill_turns, "locate": locate_turns}


def set_trainable(model, stage: str) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in TRAINABLE[stage]))


# --------------------------------------------------------------------------- main


def train(out: Path, seed: int = 0, threads: int = 1, scale: float = 1.0,
          log_path: Path | None = None, checkpoints: Path | None = None,
          init: Path | None = None) -> dict:
    """Run every stage (from ``init``, a saved v1 model: only ``RETRAIN``'s), save the model in
    ``out``, write the summary to ``log_path`` (default ``out/demo_train.json``) and return it.
    With ``checkpoints``, each finished stage is saved there (the weights, the train-stream
    positions and the stage summary) and a rerun resumes after the last saved stage. Torch's global
    RNG is not saved, so in a resumed run the read stage's auxiliary head starts from other random
    weights than in an unbroken one (mixed_stage seeds its own)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.time()
    if init is None:
        tokenizer = build.build_tokenizer(build.corpus(seed=seed))
        processor = build.build_processor(tokenizer)
        model = build.build_model(tokenizer)
        stream = Stream(seed)
    else:
        model, processor = accuracy.load(init)
        tokenizer = processor.tokenizer
        stream = Stream(seed, start=V1_TRAIN_IMAGES)
    crowded = Stream(seed, "crowded-train")
    plan = ({} if init is not None else STAGES) | RETRAIN
    steps = {k: max(1, round(n * scale)) for k, (n, _) in (STAGES | RETRAIN).items()}
    val = {"plain": dataset.flatten(dataset.generate("val", VAL_IMAGES, seed)),
           "crowded": dataset.flatten(dataset.generate("crowded-val", VAL_IMAGES, seed))}

    def probe():
        model.eval()
        acc = {split: accuracy.evaluate(model, processor, items) for split, items in val.items()}
        model.train()
        return {split: {k: round(v, 4) for k, v in a.items()} for split, a in acc.items()}

    runs = {
        "vision": lambda: pretrain_vision(model, processor, stream, steps["vision"],
                                          STAGES["vision"][1]),
        "text": lambda: pretrain_text(model, tokenizer, stream, steps["text"], STAGES["text"][1]),
    }
    for name, turns in TURNS.items():  # alignment (captions only) is not probed
        runs[name] = partial(image_text_stage, name, model, processor, stream, steps[name], STAGES[name][1],
                             turns, None if name == "align" else probe)
    runs["read"] = partial(read_stage, model, processor, stream, steps["read"], STAGES["read"][1],
                           probe)

    def plain(step, n):
        return stream.take(n)

    def crowd(step, n):
        return crowded.take(n)

    def pages(step, n):
        return [dense_page(seed, RETRAIN_PAGES + step * n + i) for i in range(n)]

    half = RETRAIN["caption"][1] // 2
    runs["caption"] = partial(mixed_stage, "caption", model, processor, seed,
                              [(plain, half, caption_turns), (crowd, half, caption_turns)], steps["caption"])
    runs["crowd"] = partial(mixed_stage, "crowd", model, processor, seed,
                            [(plain, CROWD_MIX["plain"], locate_turns),
                             (crowd, CROWD_MIX["crowded"], crowd_turns),
                             (pages, CROWD_MIX["pages"], read_turns)],
                            steps["crowd"], probe, char_loss=True)
    log: dict = {"seed": seed, "threads": threads, "scale": scale, "init": None if init is None else str(init),
                 "stage_config": {k: {"steps": steps[k], "batch": plan[k][1], "lr": LR[k],
                                      "trainable": TRAINABLE[k]} for k in plan},
                 "stages": {}}
    for name in plan:
        saved = checkpoints / f"{name}.pt" if checkpoints else None
        if saved is not None and saved.exists():
            state = torch.load(saved, weights_only=True)
            model.load_state_dict(state["model"])
            stream.next, crowded.next = state["next"], state.get("crowded_next", 0)
            log["stages"][name] = json.loads(state["summary"])
            print(f"[{name}] resumed from {saved}", flush=True)
            continue
        model.train()
        set_trainable(model, name)
        log["stages"][name] = runs[name]()
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "next": stream.next, "crowded_next": crowded.next,
                        "summary": json.dumps(log["stages"][name])}, saved)
    model.eval()
    log["train_images"], log["crowded_train_images"] = stream.next, crowded.next
    log["train_seconds"] = round(sum(st["seconds"] for st in log["stages"].values()), 1)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    reloaded, reprocessor = accuracy.load(out)
    eval_start = time.time()
    for split, key in (("test", "test_accuracy"), ("crowded", "crowded_accuracy")):
        test = accuracy.test_items(TEST_IMAGES, seed, split)
        log[key] = accuracy.evaluate(reloaded, reprocessor, test)
        log[key.replace("accuracy", "majority_baseline")] = {
            k: round(v, 4) for k, v in dataset.majority_baseline(test).items()}
        print(f"{split} accuracy {log[key]}", flush=True)
    log["test_seconds"] = round(time.time() - eval_start, 1)
    log["parameters"] = sum(p.numel() for p in reloaded.parameters())
    log["folder_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log["this_run_seconds"] = round(time.time() - start, 1)
    log["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "tokenizers": __import__("tokenizers").__version__,
                       "pillow": __import__("PIL").__version__, "numpy": np.__version__,
                       "machine": platform.machine()}
    log_path = log_path or out / "demo_train.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    return log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's step count (e.g. 0.01 for a smoke run)")
    parser.add_argument("--log", type=Path, default=None,
                        help="where to write the JSON summary (default: OUT/demo_train.json)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="save each finished stage here and resume from it on a rerun")
    parser.add_argument("--init", type=Path, default=None,
                        help="a saved v1 demo model: run only the version 2 stages from its weights")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.scale <= 0 or args.seed < 0:
        parser.error("--threads must be >= 1, --scale > 0 and --seed >= 0")
    train(args.out, args.seed, args.threads, args.scale, args.log, args.checkpoints, args.init)


if __name__ == "__main__":
    main()
