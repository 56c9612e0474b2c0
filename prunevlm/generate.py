"""`prunevlm generate`: answers for (images, videos, prompt) rows, in batches, pruned or not, each printed
after its row number and file names; optionally a picture of the kept tokens of the first batch."""

from __future__ import annotations

import os
import sys
import time

import torch


def pruning_settings(args) -> tuple[str, object, dict, str | None]:
    """(method, budget, options, config path) from --method/--budget/--option/--config, the config's where
    not given (prune() checks that they agree with it)."""
    options = dict(args.option)
    if args.config is not None:
        return args.method[0] if args.method else args.config["method"], args.budget, options, args.config["path"]
    method = args.method[0] if args.method else "flashvlm"
    return method, 64 if args.budget is None else args.budget, options, None


def run(args) -> list[str]:
    from . import prune
    from .api import resolve
    from .loading import jsonl_rows, load, prompt_inputs, read_image, read_video, with_processor_normalisation
    from .viz import check_picture_path

    if args.jsonl:
        rows = [(paths, [], prompt) for paths, prompt in jsonl_rows(args.jsonl)]
    else:
        rows = ([([path], [], args.prompt) for path in args.image] + [([], [path], args.prompt) for path in args.video]
                or [([], [], args.prompt)])
    method, budget, options, config = pruning_settings(args)
    if method != "none":  # the settings are checked before the model is loaded
        chosen, budget, budget_scope, video_scope = resolve(method, budget, config, options, args.budget_scope,
                                                            args.video_scope)
    check_picture_path(args.save_picture)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(args.model, args.dtype, args.device, args.attn)
    handle = None
    if method != "none":
        given = {*options, *(args.config["options"] if args.config else ())}
        handle = prune(model, with_processor_normalisation(chosen, processor, given), budget,
                       positions=args.positions, budget_scope=budget_scope, video_scope=video_scope)
    answers = []
    try:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            images = [[read_image(p) for p in paths] or None for paths, _, _ in batch]
            videos = [[read_video(p, args.video_frames) for p in clips] or None for _, clips, _ in batch]
            inputs = prompt_inputs(processor, images, [prompt for _, _, prompt in batch], model.device, videos)
            began = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - began
            decoded = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for row, ((paths, clips, _), answer) in enumerate(zip(batch, decoded), start):
                names = ', '.join(os.path.basename(os.path.normpath(p)) for p in paths + clips) or 'no image'
                print(f"row {row} ({names}): {answer.strip()}")
            answers += [a.strip() for a in decoded]
            report(handle, method, inputs, seconds, start)
            if args.save_picture and start == 0:
                handle.draw(inputs, processor, path=args.save_picture)
                print(f"wrote {args.save_picture} (each image beside its kept tokens, legend on top)", file=sys.stderr)
    finally:
        if handle is not None:
            handle.remove()
    return answers


def report(handle, method: str, inputs: dict, seconds: float, first_row: int) -> None:
    """One stderr line per batch: visual tokens and prompt lengths before -> after, selection and generate time."""
    rows = f"rows {first_row}-{first_row + inputs['input_ids'].shape[0] - 1}"
    if handle is None:
        print(f"[unpruned] {rows}: prompts {inputs['attention_mask'].sum(dim=1).tolist()} tokens; generate "
              f"{seconds:.2f} s", file=sys.stderr)
        return
    stats = handle.stats
    print(f"[{method}, budget {handle.budget}] {rows}: visual tokens per image {stats.tokens_before} -> "
          f"{stats.tokens_after}; prompts {stats.prefill_before} -> {stats.prefill_after} tokens; selection "
          f"{stats.selection_ms:.1f} ms; generate {seconds:.2f} s", file=sys.stderr)
