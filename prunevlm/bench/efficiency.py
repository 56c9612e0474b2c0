"""`prunevlm bench`: time to first token, LLM prefill, selection, decode, KV cache and peak memory, per method
and budget, on a randomly initialised model of one family (`--model-family`: LLaVA-1.5 by default, LLaVA-NeXT,
LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL, one image of several crops; prunevlm/bench/models.py), speed not
depending on the weights. With `--video-frames 8,32,128` (Qwen2.5-VL and LLaVA-OneVision) the prompt is one
video of each frame count instead, every configuration measured in both video scopes (per_frame, per_clip),
but those the scope does not change once per frame count (`scope_free`: the unpruned model, an in-LLM method
at a fraction).

Every time and kv_mb is the median of `--repeats` rounds after a warm-up round, in one process; a round runs
every (method, budget) once, so a slow spell of a shared machine spreads over all rows:
- kept ("tokens at LLM input"): visual tokens per image at the LLM input; for vflowopt its stage-0 count
  (its budget is the layer-averaged count), for none the image's unpruned count;
- ttft_ms: generate(max_new_tokens=1) wall time: vision tower, selection, LLM prefill and the first token;
- prefill_ms: the language model's forward at prefill only (timed by hooks that run after the pruning hook);
- selection_ms: signal hooks + the LLM-input hook that matches, selects and gathers + the in-LLM stages'
  choice (`handle.stats.selection_ms`); of which llm_choice_ms, "in LLM" in the table: building the in-LLM
  stages' views, for FastV/PDrop/DART/SparseVLM the signals at each deciding layer and their `choose`
  (inside the LLM prefill, so also part of prefill_ms);
- signal_ms: of which the signal hooks in the vision tower (`handle.stats.signal_ms`; OneVision: the received
  attention of every crop);
- decode_ms: one decoding step of the whole model (median over steps; not measured with --decode-tokens 0);
- kv_mb: keys and values held for the prompt after prefill;
- peak_mb: peak memory above the pre-call level during a separate generate(max_new_tokens=1): the CUDA
  allocator's peak, or on CPU the peak resident set size sampled every millisecond (glibc is told to map
  large blocks directly, so freed activations leave the resident set and a new peak is visible; that slows
  everything after it, so the memory runs come after all timings);
- selection_per_image: the method alone, outside the model, on random signals of the bench shape, per
  image of one call at batch 1 and at batch 16 (`SELECTION_BATCHES`), for every method and budget (LLaVA
  only: its signals are one 24 x 24 grid);
- a configuration the family or method refuses (a budget out of reach, VFlowOpt without one token grid, an
  in-LLM stage below Qwen3-VL's DeepStack layers, per_crop with an in-LLM method) is a row with the reason.

This module is the command; `timing`, `memory` and `diversity_partition` measure, `report` writes.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..budget import VIDEO_SCOPES, Budget
from ..defaults import RESULTS
from ..loading import resolve_device, resolve_dtype
from ..methods import METHODS
from ..models import get_adapter
from .diversity_partition import diversity_timing
from .memory import peak_memory
from .models import build_family, family_inputs, selection_signals, video_inputs
from .report import device_name, summary, write
from .timing import measure, selection_per_image

SELECTION_BATCHES = (1, 16)  # selection per image is also timed alone at these batch sizes
MODEL_DTYPE = ("image_tokens", "features", "text_embeds", "patches")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else resolve_dtype(args.dtype)
    methods, budgets = args.methods, [budget.value for budget in args.budgets]  # the CLI drops repeats
    family, scope = args.model_family, args.budget_scope
    print(f"building a random {args.shape}-shaped {family} model ({dtype}, {device}, attn={args.attn})...", file=sys.stderr)
    model = build_family(family, args.shape, dtype, device, args.attn)
    configs = [(method, budget) for method in methods for budget in ([None] if method == "none" else budgets)]
    prompts = [(None, None, family_inputs(family, model, args.text_tokens, device))] if not args.video_frames else [
        (frames, video_scope, video_inputs(family, model, args.text_tokens, frames, device))
        for frames in args.video_frames for video_scope in VIDEO_SCOPES]
    rows, measured = [], []
    for frames, video_scope, inputs in prompts:
        # a configuration the video scope does not change is measured with the first scope only
        runs = configs if video_scope in (None, VIDEO_SCOPES[0]) else [c for c in configs if not scope_free(*c)]
        what = "" if frames is None else f" of a {frames}-frame video, {video_scope}"
        print(f"{len(runs)} configurations{what} x {args.repeats + 1} rounds (the first warms up)...", file=sys.stderr)
        for row in measure(model, inputs, runs, args.repeats, args.decode_tokens, scope, video_scope):
            rows.append(row if frames is None else {"frames": frames, "video_scope": video_scope, **row})
            measured.append((inputs, video_scope, rows[-1]))
    diversity = diversity_timing(args.diversity_tokens) if args.diversity_tokens else None
    selection = selection_timing(args, model, dtype, device, [m for m in methods if m != "none"], budgets) \
        if family == "llava" else None
    for inputs, video_scope, row in tqdm([m for m in measured if "refused" not in m[2]], desc="peak memory", unit="run",
                                         file=sys.stderr):
        row["peak_mb"] = peak_memory(model, inputs, row["method"], row["budget"], scope, video_scope)
    report = {
        "command": "prunevlm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "prunevlm bench",
        "device": device_name(device), "model_family": family, "budget_scope": scope,
        "crops": get_adapter(model).crops(inputs["image_sizes"])[0] if "image_sizes" in inputs else 1,
        "video_frames": args.video_frames,
        "shape": args.shape, "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
        "text_tokens": args.text_tokens, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "rows": rows, "diversity_partition": diversity,
        "selection_per_image": selection,
    }
    markdown = summary(report)
    print("\n" + markdown)
    name = (args.shape if family == "llava" else f"{family}-{args.shape}") + ("-video" if args.video_frames else "")
    out = args.out or f"{RESULTS}/bench-{name}-{device.type}.json"
    write(out, report, markdown)
    print(f"\nwrote {out} and its .md table")
    return report


def scope_free(method: str, budget) -> bool:
    """Whether the video scope changes nothing: the unpruned model, and a method that prunes only inside the
    LLM at a fraction (its layer average counts over the whole video in both scopes; an int counts per frame
    in one and per video in the other)."""
    return method == "none" or (bool(METHODS[method].llm_signals) and not Budget.of(budget).is_count)


def selection_timing(args, model, dtype, device, methods: list[str], budgets: list) -> dict | None:
    """Selection per image at batch 1 and 16 (`SELECTION_BATCHES`), on signals of the bench shape: tokens,
    features, text and pixels in the model's dtype, attention probabilities in float32 as the hooks give."""
    if not methods:
        return None
    signals = selection_signals(args.shape, max(SELECTION_BATCHES), args.text_tokens)
    signals = {name: value if name == "grid" else value.to(device, dtype if name in MODEL_DTYPE else torch.float32)
               for name, value in signals.items()}
    print(f"selection alone at batch {' and '.join(map(str, SELECTION_BATCHES))}...", file=sys.stderr)
    rows = selection_per_image(signals, methods, budgets, SELECTION_BATCHES, args.repeats, get_adapter(model).num_layers)
    return {"batches": list(SELECTION_BATCHES), "rows": rows}
