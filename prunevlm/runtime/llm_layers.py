"""Progressive pruning inside the LLM (VFlowOpt stages 1 and 2, vflowopt.md §3.2), through decoder-layer
pre-hooks only (style B of transformers-integration.md §3.4), so SDPA/FlashAttention stay on.

At prefill, layer k1 receives the stage-0 sequence and keeps the text plus each image's n1 most important
visual tokens (the importance carried from stage 0); layer k2 keeps n2 of those. The text model hands the
full-length position embeddings, position ids and mask to every layer, so each layer from k1 on gets them
gathered to its view; its KV cache then holds only the survivors. While decoding, each such layer gets a
mask sized to its own, shorter cache. Rows are re-padded on the left; masks are rebuilt from the 2D padding
mask with transformers' own `create_causal_mask`, sized against the layer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Call, causal_mask, is_prefill, layer_cache_length
from .llm_input import InputPruning


@dataclass
class View:
    """The prompt columns a stage keeps: indices into the stage-0 sequence (-1 for left padding)."""

    source: torch.Tensor  # [B, L_s]
    mask: torch.Tensor  # [B, L_s] 1 for real tokens
    within_previous: torch.Tensor  # [B, L_s] index into the previous stage's view (for the hidden states)


class LayerPruning:
    def __init__(self, inputs: InputPruning):
        self.inputs = inputs
        adapter = inputs.adapter
        self.config = adapter.language_model.config
        self.views: dict[int, View] | None = None  # stage-start layer -> view, for the current prompt
        self.step: dict = {}  # per forward: the LLM's 2D mask and masks built per stage
        self.handles = [adapter.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True)]
        for index, layer in enumerate(adapter.decoder_layers()):
            self.handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.views, self.step = [], None, {}

    def _before_llm(self, module, args, kwargs):
        # Runs after the input pruning hook, so it sees the pruned prompt's mask.
        call = Call(module, args, kwargs)
        state = self.inputs.state
        prefill = is_prefill(call.cache(required=True))
        if prefill:
            self.views = self._views(state) if state is not None and any(state.visual) else None
        self.step = {"prefill": prefill, "mask": call.get("attention_mask"), "built": {}}

    def _hook(self, index: int):
        def before_layer(module, args, kwargs):
            if not self.views:
                return None
            starts = [k for k in self.views if k <= index]
            if not starts:
                return None
            return self._apply(module, index, max(starts), args, kwargs)

        return before_layer

    # -- the kept columns of each stage -----------------------------------------------------------------

    def _views(self, state) -> dict[int, View] | None:
        plans = [plan for row in state.visual for _, _, plan in row]
        if not plans or plans[0] is None or all(len(set(plan.counts)) == 1 for plan in plans):
            return None  # no in-LLM stage, or none that drops a token
        k1, k2 = plans[0].layers
        views, previous = {}, None
        for start, stage in ((k1, 1), (k2, 2)):
            view = self._stage_view(state, stage, previous)
            if k1 == k2 and stage == 2:  # both stages at one layer
                view.within_previous = views[k1].within_previous.gather(1, view.within_previous.clamp_min(0)).masked_fill(view.source < 0, -1)
            views[start] = view
            previous = view
        return views

    @staticmethod
    def _stage_view(state, stage: int, previous: View | None) -> View:
        """Text columns plus, per image, its `counts[stage]` most important surviving visual columns."""
        batch, length = state.prompt_mask.shape
        keep = state.prompt_mask.bool().clone()
        for row, images in enumerate(state.visual):
            for columns, importance, plan in images:
                alive = columns if previous is None else columns[torch.isin(columns, previous.source[row])]
                weights = importance[torch.searchsorted(columns, alive)]
                keep[row, columns] = False
                survivors = alive[weights.argsort(descending=True, stable=True)[: plan.counts[stage]]]
                keep[row, survivors] = True
        width = int(keep.sum(dim=1).max())
        source = torch.full((batch, width), -1, dtype=torch.long, device=keep.device)
        for row in range(batch):
            columns = torch.nonzero(keep[row]).flatten()
            source[row, width - columns.numel():] = columns
        if previous is None:
            within = source
        else:
            within = torch.stack([torch.searchsorted(previous.source[row], source[row]) for row in range(batch)])
            within = within.masked_fill(source < 0, -1)
        return View(source=source, mask=(source >= 0).long(), within_previous=within)

    # -- one decoder layer ------------------------------------------------------------------------------

    def _apply(self, layer, index: int, start: int, args, kwargs):
        view = self.views[start]
        call = Call(layer, args, kwargs)
        hidden = call["hidden_states"]
        batch = hidden.shape[0]
        past = call.cache(required=True)
        if self.step["prefill"]:
            if index == start:
                hidden = _gather(hidden, view.within_previous)
            cos, sin = call["position_embeddings"]
            call.update(position_embeddings=(_gather(cos.expand(batch, -1, -1), view.source),
                                             _gather(sin.expand(batch, -1, -1), view.source)))
            positions = call.get("position_ids")
            if positions is not None:
                call.update(position_ids=_gather(positions.expand(batch, -1), view.source))
            mask = view.mask
        else:
            # this layer's cache holds its view of the prompt plus the generated tokens
            generated = hidden.shape[1] + layer_cache_length(past, index) - view.source.shape[1]
            llm_mask = self.step["mask"]
            tail = (llm_mask[:, -generated:] if llm_mask is not None
                    else torch.ones(batch, generated, dtype=view.mask.dtype, device=hidden.device))
            mask = torch.cat([view.mask, tail.to(view.mask.dtype)], dim=1)
        built = self.step["built"]  # layers of one stage share their mask
        if start not in built:
            built[start] = causal_mask(self.config, hidden, mask, past, index)
        return call.update(hidden_states=hidden, attention_mask=built[start])


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, L, ...] gathered along dim 1 by index [B, L'] (-1 gives zeros)."""
    shape = (*index.shape, *values.shape[2:])
    picked = values.gather(1, index.clamp_min(0).view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    return picked.masked_fill((index < 0).view(*index.shape, *([1] * (values.dim() - 2))), 0)
