"""Shorten the sequence at the LLM input, through hooks only (docs/transformers.md §1, pruning before the LLM).

Three hooks cooperate:
- a pre-hook on the base model (e.g. `LlavaModel`) finds each image's placeholder columns in `input_ids`
  and checks them against the images before anything runs (`placeholders.py`);
- the adapter's vision hooks record the signals the method needs (`models/`);
- a pre-hook on the language model receives the merged `inputs_embeds` at prefill, asks the method which
  visual tokens to keep, and gathers embeddings, position ids and the attention mask. Rows are re-padded
  on the left to a common length. Where no image loses a token the call goes through unchanged. Decoding
  steps are fixed up in `decoding.py`.

Kept tokens keep their original position ids by default (required for M-RoPE, and what `generate()`
assumes when it extends positions by last + 1); `positions="compact"` renumbers them contiguously.
Each prefill with images leaves a `Prefill` record for the KV cache it fills (`record.py`); its decoding
steps continue from that record, so generations may interleave. Forwards of the base model run one at a
time per handle (docs/architecture.md, threads). Methods with in-LLM stages get a `LayerPruning`
(`llm_layers.py`), started by the language-model hook after the input is pruned, so the layer stages
always see the pruned prompt.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch

from ..budget import Budget, check_budget_scope, check_video_scope
from ..errors import HandleConflict, InvalidInput, InvalidSetting, Unsupported
from ..methods.base import LAYOUT_SIGNALS, Method, Plan, Refused, Selection, SignalsUnavailable
from ..methods.uniform import plane_shares
from ..models.base import Adapter, Capture, synchronize
from .choice import NEWLINE_POLICIES, ImageChoice
from .contract import Call, ContractError, check_dynamic, is_prefill, output_cache
from .decoding import fix_decode
from .llm_layers import LayerPruning
from .placeholders import locate_images, placeholder_mask
from .record import KeptImage, Prefill, Stats, VideoStats


class InputPruning:
    """Attach `method` with a per-image `budget` to a model through `adapter`; see the module docstring.

    A video is located like an image (its placeholders, by the video token id) and pruned as one image whose
    frames are its crops: `video_scope="per_frame"` selects in each frame with the budget counted on the
    frame, "per_clip" selects over the whole clip with the frames as its planes (docs/architecture.md, video).
    """

    def __init__(self, adapter: Adapter, method: Method, budget: Budget, positions: str = "original",
                 newline: str = "drop", budget_scope: str = "per_image", video_scope: str = "per_frame"):
        if positions not in ("original", "compact"):
            raise InvalidSetting(f"positions must be 'original' or 'compact', got {positions!r}")
        if newline not in NEWLINE_POLICIES:
            raise InvalidSetting(f"newline must be one of {', '.join(map(repr, NEWLINE_POLICIES))}, got {newline!r}")
        if check_budget_scope(budget_scope) == "per_crop" and method.prunes_in_llm:
            raise Refused(f"budget_scope='per_crop' splits the budget over each image's crops at the LLM input, but "
                          f"{method.name} prunes inside the LLM, where the tokens of all crops compete; use "
                          f"budget_scope='per_image' with it")
        if positions == "compact" and not adapter.compact_positions:
            raise Refused(f"{adapter.family} uses M-RoPE, whose positions encode the image grid; use positions='original'")
        missing = set(method.signals) - adapter.provides
        if missing:
            why = adapter.why_unavailable(missing)
            raise SignalsUnavailable(f"{method.name} needs signal(s) {sorted(missing)} that the {adapter.family} adapter "
                                     f"cannot provide" + (f" for this model: {why}" if why else ""))
        self.adapter, self.method, self.budget, self.positions, self.newline = adapter, method, budget, positions, newline
        self.budget_scope, self.video_scope = budget_scope, check_video_scope(video_scope)
        self.num_layers = adapter.num_layers
        self.required = set(method.signals)
        self.needed = self.required | (set(method.optional_signals) & adapter.provides)
        self.capture = Capture()
        self.records: dict[int, tuple[weakref.ref, Prefill | None]] = {}  # per KV cache: its prefill's record
        self.local = threading.local()  # per thread: its last prefill's Stats, and its hold on the lock
        self.lock = threading.RLock()  # one forward of the base model at a time (docs/architecture.md, threads)
        # (row, columns, is_video) per image or video, located by the base-model hook for one forward
        self.images: list[tuple[int, torch.Tensor, bool]] | None = None
        self.caller_positions = False  # whether this forward's caller passed position ids
        self.pending: tuple[Prefill | None] | None = None  # this forward's prefill, until its cache is known
        self.layers = LayerPruning(adapter, method) if method.prunes_in_llm else None
        self.handles = adapter.install(self.needed, self.capture)
        self.handles.append(adapter.base.register_forward_pre_hook(self._before_base, with_kwargs=True))
        self.handles.append(adapter.base.register_forward_hook(self._after_base, with_kwargs=True, always_call=True))
        lm = adapter.language_model
        self.handles.append(lm.register_forward_pre_hook(self._before_llm, with_kwargs=True))
        self.handles.append(lm.register_forward_hook(self._after_llm, with_kwargs=True))
        if adapter.model is not adapter.base:
            self.handles.append(adapter.model.register_forward_pre_hook(self._before_outer, with_kwargs=True))

    @property
    def stats(self) -> Stats:
        """The calling thread's last prefill."""
        return getattr(self.local, "stats", None) or Stats()

    @stats.setter
    def stats(self, stats: Stats) -> None:
        self.local.stats = stats

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.layers is not None:
            self.layers.remove()
        self.handles = []
        self.capture.clear()
        self.records.clear()
        self.images = self.pending = None

    def __deepcopy__(self, memo):
        raise HandleConflict(
            "a model under a pruning handle cannot be deep-copied: the copy would carry the handle's hooks, still "
            "bound to the original model's records, and its own images would never be found. Call handle.remove(), "
            "copy the model, then prune each copy")

    # -- hooks ------------------------------------------------------------------------------------------

    def _before_outer(self, module, args, kwargs):
        if Call(module, args, kwargs).get("labels") is not None:
            raise InvalidInput(
                "labels are not supported while visual tokens are pruned: the pruned sequence is shorter than "
                "the labels. Remove the pruning handle to compute a loss."
            )

    def _before_base(self, module, args, kwargs):
        self.lock.acquire()  # released by _after_base, which runs even when the forward raises
        self.local.held = getattr(self.local, "held", 0) + 1
        call = Call(module, args, kwargs)
        self.adapter.check_inputs(call.kwargs)
        counts = {False: self.adapter.image_token_counts(call.kwargs), True: self.adapter.video_token_counts(call.kwargs)}
        self.images, self.pending = None, None
        self.caller_positions = call.get("position_ids") is not None
        if not is_prefill(call.cache(required=False)):
            if counts[False] or counts[True]:
                raise Unsupported(
                    "new images or videos after the first forward of a cached sequence cannot be pruned; start a "
                    "new generation with all images and videos in the prompt, or remove the pruning handle"
                )
            return
        self.images = []
        for is_video, token_id in ((False, self.adapter.image_token_id), (True, self.adapter.video_token_id)):
            placeholders = placeholder_mask(self.adapter, call.get("input_ids"), call.get("inputs_embeds"), token_id) if counts[is_video] else None
            if placeholders is not None:  # none of this kind: its placeholder ids in the text are text, as unhooked
                kind = "video" if is_video else "image"
                self.images += [(row, columns, is_video) for row, columns in locate_images(placeholders, counts[is_video], kind)]
        self.images.sort(key=lambda item: (item[0], int(item[1][0])))  # prompt order

    def _after_base(self, module, args, kwargs, output):
        if not getattr(self.local, "held", 0):
            return  # an earlier pre-hook raised before ours took the lock
        pending, self.images = self.images, None
        self.local.held -= 1
        self.lock.release()
        if pending and output is not None:
            raise ContractError(f"the prompt's {len(pending)} image(s) were located, but the language model's pruning "
                                f"hook never received them as a prefill")

    def _before_llm(self, module, args, kwargs):
        call = Call(module, args, kwargs)
        cache = call.cache(required=True)
        check_dynamic(cache)
        prefill = is_prefill(cache)
        if prefill:
            record, result = self._start_prefill(call)
            self.pending = (record,)
        else:
            record, result = self._continue_decoding(call, cache)
        if self.layers is not None:  # after the input pruning: the stages see the pruned prompt and mask
            self.layers.begin_forward(record, prefill, call.get("attention_mask"), self.stats)
        return result

    def _start_prefill(self, call: Call) -> tuple[Prefill | None, tuple | None]:
        images, self.images = self.images, None
        if not images:
            self.capture.clear()
            self._record_unpruned(call)
            return None, None
        return self._prune_prefill(call, images)

    def _continue_decoding(self, call: Call, cache) -> tuple[Prefill | None, tuple | None]:
        if self.images:
            raise ContractError("the base model saw a prefill with images, but its language model received a "
                                "non-empty cache")
        found = self.records.get(id(cache))
        if found is None or found[0]() is not cache:
            raise HandleConflict(
                "a decoding step continues a KV cache that no prefill under this pruning handle produced: a copy of a "
                "cache (copy.deepcopy, or one rebuilt from its tensors), or a cache filled before prune() was "
                "attached. Continue the cache the pruned prefill returned, or start the generation again under the "
                "handle (if your code made no copy, transformers did: please report it)")
        record = found[1]
        if record is None or not record.rewritten:
            return record, None  # the prompt reached the language model unchanged: nothing to narrow
        return record, fix_decode(record, call, cache, self.caller_positions)

    def _after_llm(self, module, args, kwargs, output):
        pending, self.pending = self.pending, None
        cache = output_cache(output)
        if pending is None or cache is None:
            return
        (record,) = pending
        if record is not None and cache.get_seq_length() != record.pruned_length:
            raise ContractError(f"a prefill pruned to {record.pruned_length} tokens left {cache.get_seq_length()} in "
                                f"the language model's cache")
        key = id(cache)
        self.records[key] = (weakref.ref(cache, lambda _, key=key: self.records.pop(key, None)), record)

    # -- prefill --------------------------------------------------------------------------------------

    def _prune_prefill(self, call: Call, images: list[tuple[int, torch.Tensor, bool]]) -> tuple[Prefill, tuple | None]:
        """The prefill's record and the language model's shortened call; where no image loses a token, the
        call is left as it came (the identity, padding and shapes included: docs/architecture.md)."""
        embeds = call["inputs_embeds"]
        synchronize(embeds.device)
        start = time.perf_counter()
        batch, length, _ = embeds.shape
        mask = call.get("attention_mask")
        if mask is not None and (isinstance(mask, dict) or mask.dim() != 2):
            raise Unsupported(
                "pruning needs a 2D padding mask [batch, length]; prepared 4D masks are not supported: pass the "
                "attention_mask the processor returns"
            )
        real = torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        image_columns = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        for row, columns, _ in images:
            image_columns[row, columns] = True
        text_columns = real & ~image_columns
        text_per_row = [torch.nonzero(text_columns[row]).flatten() for row in range(batch)]

        # index_select, not embeds[row, columns]: the same rows, 7x faster on the CPU
        image_tokens = [embeds[row].detach().index_select(0, columns) for row, columns, _ in images]
        signals, signal_seconds = self.capture.match(image_tokens)
        choices = self._choose(images, image_tokens, embeds.detach(), text_per_row, signals)
        per_row = [[c for c in choices if c.row == row] for row in range(batch)]
        caller_positions = call.get("position_ids")
        whole = all(c.placeholders.numel() == c.columns.numel() and c.tokens is None for c in choices)
        if whole:
            source, new_mask = torch.arange(length, device=embeds.device).expand(batch, length), real.long()
            update = None
        else:
            source, new_mask, update = self._shortened(call, choices, text_per_row, real)
        synchronize(embeds.device)
        select_seconds = time.perf_counter() - start

        record = Prefill(
            prompt_length=length,
            pruned_length=source.shape[1],
            prompt_mask=new_mask,
            images=[[KeptImage(torch.searchsorted(source[row], c.chosen), c.importance, c.plan) for c in row_choices]
                    for row, row_choices in enumerate(per_row)],
            rewritten=not whole,
        )
        if not whole:
            self._record_positions(record, caller_positions, new_mask, batch, length, embeds.device)
        real_before = real.sum(dim=1)
        self.stats = Stats(
            tokens_before=[[c.columns.numel() for c in row] for row in per_row],
            tokens_after=[[c.placeholders.numel() for c in row] for row in per_row],
            budget_scope=self.budget_scope,
            budget_tokens=[[min(c.plan.counts[0], c.columns.numel()) for c in row] for row in per_row],
            prefill_before=real_before.tolist(),
            prefill_after=real_before.tolist() if whole else new_mask.sum(dim=1).tolist(),
            selection_ms=1000 * (signal_seconds + select_seconds),
            signal_ms=1000 * signal_seconds,
            stages=[[c.plan for c in row] for row in per_row] if self.method.prunes_in_llm else [],
            kept=[[c.placeholders for c in row] for row in per_row],
            recycled=[[c.recycled for c in row] for row in per_row],
            input_columns=source.clone(),
            videos=[[self._video_stats(c) for c in row] for row in per_row],
        )
        return record, update

    def _shortened(self, call: Call, choices: list[ImageChoice], text_per_row: list[torch.Tensor], real: torch.Tensor):
        """The kept columns (source [B, L'], -1 for padding), the new padding mask, and the language model's call
        gathered to them: embeddings (recycled tokens at their slots), mask, positions, family inputs. A kept
        placeholder the caller's mask hides stays hidden."""
        embeds = call["inputs_embeds"]
        batch, length, _ = embeds.shape
        kept = list(text_per_row)
        for choice in choices:
            kept[choice.row] = torch.cat([kept[choice.row], choice.chosen, choice.columns[choice.newlines]])
        source = self._source_columns(kept, embeds.device)
        # rows of the flattened batch: a copy like gather's, without its per-element index arithmetic
        flat_source = (source.clamp_min(0) + length * torch.arange(batch, device=embeds.device)[:, None]).flatten()
        new_embeds = embeds.flatten(0, 1).index_select(0, flat_source).view(batch, -1, embeds.shape[-1])
        for choice in choices:
            if choice.tokens is not None:  # recycled tokens replace the values at their slots
                slots = torch.searchsorted(source[choice.row], choice.chosen)
                new_embeds[choice.row, slots] = choice.tokens.to(new_embeds.dtype)
        new_mask = ((source >= 0) & real.gather(1, source.clamp_min(0))).long()
        new_embeds.masked_fill_(~new_mask.bool()[..., None], 0)
        family_inputs = self.adapter.narrow_llm_inputs(call.kwargs, flat_source, new_mask.bool().flatten())
        positions = self._prefill_positions(call.get("position_ids"), source, new_mask, batch, length, embeds.device)
        update = call.update(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=positions, **family_inputs)
        return source, new_mask, update

    def _choose(self, images, image_tokens, embeds, text_per_row, recorded) -> list[ImageChoice]:
        """Run the method once per group of images that can share one call, for the whole batch.

        A call takes [B, N, ...] signals and one count k, and returns [B, k]: images are grouped by token
        count N (which fixes the plan, so k), grid and text length. Images of different N are not padded into
        one call, because for every method the selection itself depends on N: k differs under a fractional
        budget (the output would be ragged), the diversity partition's rounds (their number and the A/B
        split by position) follow each image's residual size, FlashVLM's top-p quantile and every softmax
        and min-max run over the N real tokens, VFlowOpt's recycling cells and the uniform sample follow the
        grid, and the random draw is a permutation of N; a mask would have to enter each of these steps.
        Text is not padded either: padded text (with `text_mask`) changes FlashVLM's relevance in the last
        bit on the CPU (the product's kernel for a few text rows, and the softmax and sum over them, depend
        on the text length), which the sharpening turns into other kept indices. Returns the choices in the
        images' order.
        """
        candidates = [self._candidates(signals, columns.device) for (_, columns, _), signals in zip(images, recorded)]
        inputs = [self._signals(tokens, embeds, row, columns, text_per_row[row], signals, selectable, is_video)
                  for (row, columns, is_video), tokens, signals, (selectable, _) in zip(images, image_tokens, recorded, candidates)]
        choices: list[ImageChoice | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, signals in enumerate(inputs):
            if images[i][2]:
                choices[i] = self._choose_video(images[i], signals, recorded[i], candidates[i])
            elif self.budget_scope == "per_crop":
                choices[i] = self._choose_in_crops(images[i], signals, recorded[i], candidates[i])
            else:
                groups.setdefault((images[i][1].numel(), *self._group_key(signals)), []).append(i)
        for members in groups.values():
            plan = self._plan(self.budget, images[members[0]][1].numel())
            # newlines are no candidates: a count above the candidates keeps them all (and the newlines by policy)
            count = min(plan.counts[0], inputs[members[0]]["image_tokens"].shape[0])
            with torch.no_grad():
                selection = self.method(Budget(count), **self._stack([inputs[i] for i in members]))
            for index, i in enumerate(members):
                row, columns, _ = images[i]
                choices[i] = ImageChoice(row, columns, selection, index, plan, *candidates[i], self.newline)
        return choices

    def _plan(self, budget: Budget, num_tokens: int) -> Plan:
        """The method's plan for one image (or video) of `num_tokens` tokens, refused where an in-LLM stage
        would start below the layers that still add vision features (DeepStack)."""
        plan = self.method.plan(budget, num_tokens, self.num_layers)
        if plan.layers and min(plan.layers) < self.adapter.first_stage_layer:
            raise Refused(
                f"{self.method.name} would prune at LLM layer {min(plan.layers)}, but {self.adapter.family} still "
                f"adds vision features to the visual positions up to layer {self.adapter.first_stage_layer - 1} "
                f"(DeepStack); set the method's layers to {self.adapter.first_stage_layer} or later")
        return plan

    def _choose_video(self, video, signals: dict, recorded: dict, candidates: tuple) -> ImageChoice:
        """One video (docs/models.md §7): its t frames of h x w content tokens (the candidates; OneVision's
        trailing newline is none and always kept). per_clip: the method runs once on the clip, the frames as
        its planes, with the budget counted on the clip's tokens. per_frame: it runs on each frame alone with
        the budget counted on the frame; a method with in-LLM stages plans over the clip (the layer average
        of all its tokens; an int k counts as k per frame) and its first count is shared evenly by the frames."""
        row, columns, _ = video
        frames, height, width = recorded["frames"]
        per_frame, num_tokens = height * width, frames * height * width
        if signals["image_tokens"].shape[0] != num_tokens:
            raise ContractError(f"a video of {frames} frames of {height}x{width} tokens reached the language model "
                                f"with {signals['image_tokens'].shape[0]} candidate tokens")
        if self.video_scope == "per_clip":
            plan = self._plan(self.budget, num_tokens)
            clip = {name: value for name, value in signals.items() if name != "grid"}  # the layout is the planes
            if "planes" in clip:
                clip["planes"] = ((height, width),) * frames
            with torch.no_grad():
                selection = self.method(Budget(min(plan.counts[0], num_tokens)), **self._stack([clip]))
            return ImageChoice(row, columns, selection, 0, plan, *candidates, "keep_all", (frames, height, width))
        if self.method.whole_clip:  # it compares frames: every frame's count, chosen on the whole clip at once
            clip = {name: value for name, value in signals.items() if name != "grid"}
            with torch.no_grad():
                selection = self.method.select_frames(self.budget, **self._stack([clip]))
            plan = Plan((selection.keep.shape[1],), (), self.num_layers)
            return ImageChoice(row, columns, selection, 0, plan, *candidates, "keep_all", (frames, height, width))
        if self.method.prunes_in_llm:
            budget = Budget(frames * min(self.budget.value, per_frame)) if self.budget.is_count else self.budget
            clip_plan = self._plan(budget, num_tokens)
            shares = plane_shares(min(clip_plan.counts[0], num_tokens), [per_frame] * frames)
        else:
            clip_plan, shares = None, [self.budget.tokens_to_keep(per_frame)] * frames
        members = torch.arange(num_tokens, device=columns.device).view(frames, per_frame)
        selection = self._select_in_parts(signals, [(members[f], share, (height, width)) for f, share in enumerate(shares)])
        counts = (sum(shares),) if clip_plan is None else (sum(shares), *clip_plan.counts[1:])
        plan = Plan(counts, () if clip_plan is None else clip_plan.layers, self.num_layers)
        return ImageChoice(row, columns, selection, 0, plan, *candidates, "keep_all", (frames, height, width))

    def _select_in_parts(self, signals: dict, parts: list[tuple[torch.Tensor, int, tuple[int, int]]]) -> Selection:
        """The method run on each part alone (its token indices among the signals', its count, its row-major
        (rows, columns) plane, which becomes its layout: grid, planes, frames), one image's selections joined
        in token order; a part with count 0 keeps nothing."""
        chosen = []
        for members, count, (height, width) in parts:
            if count == 0:
                continue
            layout = {"grid": (height, width), "planes": ((height, width),), "frames": (1, height, width)}
            part = {}
            for name, value in signals.items():
                if name in LAYOUT_SIGNALS:
                    part[name] = layout[name]
                elif name == "text_embeds":
                    part[name] = value
                elif name == "attention":  # a map among the tokens: its rows and columns
                    part[name] = value.index_select(0, members).index_select(1, members)
                else:
                    part[name] = value.index_select(0, members)
            with torch.no_grad():
                chosen.append((members, self.method(Budget(count), **self._stack([part]))))
        keep = torch.cat([members[selection.keep[0]] for members, selection in chosen])
        order = keep.argsort()

        def joined(name: str) -> torch.Tensor | None:
            values = [getattr(selection, name) for _, selection in chosen]
            return None if values[0] is None else torch.cat([value[0] for value in values])[order][None]

        return Selection(keep=keep[order][None], tokens=joined("tokens"), recycled=joined("recycled"),
                         importance=joined("importance"))

    def _video_stats(self, choice: ImageChoice) -> VideoStats | None:
        """Per-frame counts of a video's choice; None for an image."""
        if choice.frames is None:
            return None
        frames, height, width = choice.frames
        after = torch.bincount(choice.keep // (height * width), minlength=frames)
        return VideoStats(frames, [height * width] * frames, after.tolist(), self.video_scope)

    def _choose_in_crops(self, image, signals: dict, recorded: dict, candidates: tuple) -> ImageChoice:
        """budget_scope="per_crop": the method runs on each crop's candidates alone, with the budget counted on
        that crop's candidates (an int: min(k, its tokens); a fraction: of its tokens, rounded to nearest, at
        least one), so each crop keeps exactly its own count, as the papers' per-crop budgets mean. Where the
        adapter records no "crops" (per placeholder: its crop and its row within the crop), the image is one
        crop. A method's layout signals ("grid", "planes") become the crop's own plane: its candidates,
        row-major, have as many rows as distinct rows within the crop."""
        row, columns, _ = image
        num_candidates = signals["image_tokens"].shape[0]
        crops = recorded.get("crops")
        if crops is None:
            crops = torch.zeros(num_candidates, 2)
        crops = crops.to(columns.device)
        if candidates[0] is not None:
            crops = crops.index_select(0, candidates[0])
        if not torch.equal(crops, crops.round()):
            raise Refused("budget_scope='per_crop' needs every token to come from one crop, but this image's tokens "
                          "mix neighbouring crops (its tile plane was downscaled bilinearly); use "
                          "budget_scope='per_image' for it")
        parts = []
        for crop in crops[:, 0].unique():
            members = torch.nonzero(crops[:, 0] == crop).flatten()
            height = crops[members, 1].unique().numel()
            parts.append((members, self.budget.tokens_to_keep(members.numel()), (height, members.numel() // height)))
        selection = self._select_in_parts(signals, parts)
        keep = selection.keep[0]
        # every crop whole: the image is kept whole, newlines included (the identity, as per_image)
        count = columns.numel() if keep.numel() == num_candidates else keep.numel()
        plan = Plan((count,), (), self.num_layers)
        return ImageChoice(row, columns, selection, 0, plan, *candidates, self.newline)

    @staticmethod
    def _candidates(recorded: dict, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The image's selectable placeholders (indices) and rows, where the adapter recorded them."""
        candidates = recorded.get("candidates")
        if candidates is None:
            return None, None
        return torch.nonzero(candidates.to(device)).flatten(), recorded["rows"].to(device)

    @staticmethod
    def _group_key(signals: dict) -> tuple:
        """Images with equal keys go in one method call: token count, layout (grid, planes) and text length."""
        text = signals.get("text_embeds")
        layout = tuple(None if signals.get(name) is None else tuple(signals[name]) for name in LAYOUT_SIGNALS)
        return signals["image_tokens"].shape[0], *layout, None if text is None else text.shape[0]

    @staticmethod
    def _stack(group: list[dict]) -> dict:
        """One batch of signals from the images of a group (the layout is the group's)."""
        return {name: value if name in LAYOUT_SIGNALS else torch.stack([signals[name] for signals in group])
                for name, value in group[0].items()}

    def _signals(self, image_tokens, embeds, row, columns, text, recorded, index, is_video) -> dict:
        """The method's inputs for one image or video, unbatched (`text`: the row's text columns; `index`: the
        placeholders the method may choose from, None for all). "frames" is a video's only."""
        signals = {"image_tokens": image_tokens if index is None else image_tokens.index_select(0, index)}
        if self.needed & {"text_embeds", "text_mask"}:
            if self.method.text_before_first_image:
                text = text[text < columns[0]]
            signals["text_embeds"] = embeds[row].index_select(0, text)
        for name in self.needed - {"image_tokens", "text_embeds", "text_mask"}:
            if name == "frames" and not is_video:
                if name in self.required:
                    raise Refused(f"{self.method.name} prunes videos only (it needs the frames of a video), but the "
                                  f"prompt holds an image; prune images with another method")
                continue
            value = recorded.get(name)
            if value is None:
                raise ContractError(f"the vision hooks recorded an image's tokens but not its {name!r}")
            signals[name] = value if name in LAYOUT_SIGNALS else value.to(embeds.device)
            if index is not None and name not in LAYOUT_SIGNALS:
                signals[name] = signals[name].index_select(0, index)
        return signals

    @staticmethod
    def _source_columns(kept: list[torch.Tensor], device) -> torch.Tensor:
        """[B, L'] original column per new column, rows left-padded with -1."""
        width = max(k.numel() for k in kept)
        source = torch.full((len(kept), width), -1, dtype=torch.long, device=device)
        for row, columns in enumerate(kept):
            if columns.numel():
                source[row, width - columns.numel():] = columns.sort().values
        return source

    def _prefill_positions(self, positions, source, new_mask, batch, length, device):
        if self.positions == "compact":
            return (new_mask.cumsum(dim=1) - 1).clamp_min(0)
        if positions is None:
            positions = torch.arange(length, device=device).expand(batch, length)
        index = source.clamp_min(0).expand(*positions.shape[:-2], -1, -1)
        return positions.gather(-1, index).masked_fill(source < 0, 0)

    def _record_positions(self, record: Prefill, positions, new_mask, batch, length, device) -> None:
        """The prompt's next position in the caller's coordinates (its last position + 1, as generate() extends
        it; arange(L) where it passed none, as the model counts) and, for compact positions, the shift to the
        pruned model's (decoding.py)."""
        if positions is None:
            positions = torch.arange(length, device=device).expand(batch, length)
        record.next_position = (positions[..., -1] + 1).expand(*positions.shape[:-2], batch)
        shift = torch.zeros(batch, dtype=torch.long, device=device)
        if self.positions == "compact":
            shift = record.next_position - new_mask.sum(dim=1)
        record.shift = shift

    def _record_unpruned(self, call: Call):
        embeds = call.get("inputs_embeds")
        mask = call.get("attention_mask")
        if embeds is None:
            return
        lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None or mask.dim() != 2 else mask.sum(dim=1).tolist()
        self.stats = Stats(
            tokens_before=[[] for _ in lengths], tokens_after=[[] for _ in lengths],
            prefill_before=lengths, prefill_after=lengths,
            input_columns=torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1).clone(),
        )
