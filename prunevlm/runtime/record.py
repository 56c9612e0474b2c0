"""What a pruned prefill leaves behind: the statistics users read (`handle.stats`) and the record its decoding
steps and in-LLM stages continue from (docs/transformers.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..methods.base import Plan


@dataclass
class Stats:
    """What the last prefill did, per batch row and per image in the row (a text-only prefill has no images)."""

    tokens_before: list[list[int]] = field(default_factory=list)  # visual tokens per image, per row
    tokens_after: list[list[int]] = field(default_factory=list)  # placeholders that reached the LLM, newlines included
    budget_scope: str = "per_image"  # how the budget counted (prune's budget_scope)
    # per row, per image: the tokens its budget granted at the LLM input (per_crop: the sum of its crops'
    # counts); kept newlines come on top, and an image kept whole grants all its placeholders
    budget_tokens: list[list[int]] = field(default_factory=list)
    prefill_before: list[int] = field(default_factory=list)  # real (unpadded) prompt tokens per row
    prefill_after: list[int] = field(default_factory=list)
    # for the batch: signal hooks + the whole LLM-input hook (matching, method, gathers) + the in-LLM stages' views
    selection_ms: float = 0.0
    signal_ms: float = 0.0  # of which: computing signals in the vision hooks
    llm_choice_ms: float = 0.0  # of which: in-LLM stages' views (for LLM-signal methods: signals at the deciding layers and `choose`)
    stages: list[list[Plan]] = field(default_factory=list)  # in-LLM methods: per row, per image, its Plan
    kept: list[list] = field(default_factory=list)  # per row, per image: kept token indices within the image
    recycled: list[list] = field(default_factory=list)  # per row, per image: which kept indices hold recycled tokens
    # [B, L'] per position of the sequence the language model received (so of the logits a forward returns), the
    # column of the caller's input it holds; -1 where re-padding the shortened rows added a pad
    # (docs/architecture.md, what a forward returns)
    input_columns: torch.Tensor | None = None
    # per row, per image: a video's frames and per-frame counts (VideoStats), None for an image
    videos: list[list] = field(default_factory=list)

    @property
    def layer_average(self) -> list[list[float]]:
        """Visual tokens per image averaged over the LLM's layers (= tokens_after without in-LLM stages)."""
        if not self.stages:
            return [[float(n) for n in row] for row in self.tokens_after]
        return [[plan.layer_average for plan in row] for row in self.stages]

    def __str__(self) -> str:
        rows = [f"row {b}: images {before} -> {after} tokens, prompt {pb} -> {pa}"
                for b, (before, after, pb, pa) in enumerate(zip(self.tokens_before, self.tokens_after, self.prefill_before, self.prefill_after))]
        for b, row in enumerate(self.stages):
            rows += [f"row {b}: image {i}: {plan.counts} visual tokens from layers {'/'.join(map(str, (0, *plan.layers)))}, "
                     f"layer average {plan.layer_average:.1f}" for i, plan in enumerate(row)]
        rows += [f"row {b}: image {i} is a video of {video.frames} frames, tokens per frame {video.before} -> "
                 f"{video.after} ({video.scope})"
                 for b, row in enumerate(self.videos) for i, video in enumerate(row) if video is not None]
        if self.budget_tokens:
            rows.append(f"budget ({self.budget_scope}) granted {self.budget_tokens} tokens")
        parts = f"signals {self.signal_ms:.2f} ms" + (f", in the LLM {self.llm_choice_ms:.2f} ms" if self.stages else "")
        return "\n".join(rows + [f"selection {self.selection_ms:.2f} ms ({parts})"])


@dataclass
class VideoStats:
    """One video of a prefill: the frames the model encoded (Qwen: temporal patches; OneVision: sampled
    frames) and the tokens of each before and after pruning, under `scope` (prune's video_scope)."""

    frames: int
    before: list[int]  # tokens per frame
    after: list[int]  # kept tokens per frame (OneVision's trailing newline not counted)
    scope: str


@dataclass
class KeptImage:
    """One image of a pruned prompt, as its in-LLM stages need it."""

    columns: torch.Tensor  # its kept columns in the pruned sequence, ascending
    importance: torch.Tensor | None  # per kept column, carried from the method's selection
    plan: Plan


@dataclass
class Prefill:
    """What a prefill with images leaves for its decoding steps and for the in-LLM stages (one per KV cache).

    `rewritten` is False where no image lost a token at the LLM input: the call went through unchanged, so its
    decoding steps need nothing (the in-LLM stages may still prune). Positions are kept in the caller's
    coordinates, those of the unpruned model: `next_position` is the position generate() gives the first token
    after the prompt (the prompt's last position + 1, per position row), and `shift` what is subtracted from
    such a position to get the one the pruned model uses (non-zero for positions="compact" only)."""

    prompt_length: int  # L, the unpruned prompt length (with the caller's padding)
    pruned_length: int  # L', after pruning and re-padding
    prompt_mask: torch.Tensor  # [B, L'] 1 for real tokens
    images: list[list[KeptImage]]  # per row
    rewritten: bool = True
    next_position: torch.Tensor | None = None  # [..., B] (the leading dims of the caller's position ids)
    shift: torch.Tensor | None = None  # [B]
    views: dict | None = None  # in-LLM stages: stage-start layer -> the columns kept from there (llm_layers.View)
