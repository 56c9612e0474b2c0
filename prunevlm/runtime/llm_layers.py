"""Progressive pruning inside the LLM (the in-LLM stages of each image's `Plan`, e.g. VFlowOpt's at k1 and
k2, docs/vflowopt.md §3.2), through decoder-layer pre-hooks only (docs/transformers.md §1, pruning inside
the LLM), so SDPA/FlashAttention stay on.

At prefill, the layer where stage s starts receives the previous stage's sequence and keeps the text plus
each image's counts[s] most important visual tokens (the importance carried from the selection). The text model hands the
full-length position embeddings, position ids and mask to every layer, so each layer from k1 on gets them
gathered to its view; its KV cache then holds only the survivors. While decoding, each such layer gets a
mask sized to its own, shorter cache. Rows are re-padded on the left; masks are rebuilt from the 2D padding
mask with transformers' own `create_causal_mask`, sized against the layer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Call, causal_mask, layer_cache_length


@dataclass
class View:
    """The prompt columns a stage keeps: indices into the stage-0 sequence (-1 for left padding)."""

    source: torch.Tensor  # [B, L_s]
    mask: torch.Tensor  # [B, L_s] 1 for real tokens
    within_previous: torch.Tensor  # [B, L_s] index into the previous stage's view (for the hidden states)


@dataclass
class ForwardStep:
    """One forward of the language model, as its decoder-layer hooks need it."""

    prefill: bool
    views: dict[int, View] | None  # from the prefill this forward belongs to
    mask: torch.Tensor | None  # the language model's 2D mask (the pruned prompt, then the generated tokens)
    built: dict[int, object]  # stage-start layer -> the causal mask built for its layers in this forward


class LayerPruning:
    """Decoder-layer hooks that run the in-LLM stages of each image's `Plan`; `InputPruning` starts each
    forward of the language model with `begin_forward`, after pruning its input."""

    def __init__(self, adapter):
        self.config = adapter.language_model.config
        self.step: ForwardStep | None = None
        self.handles = [layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)
                        for index, layer in enumerate(adapter.decoder_layers())]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.step = [], None

    def begin_forward(self, prefill, is_prefill: bool, mask: torch.Tensor | None) -> None:
        """`prefill`: the last pruned prefill's record (None: nothing pruned in this generation); at a prefill
        its stage views are computed once and kept on it for the decoding steps."""
        if prefill is not None and is_prefill:
            prefill.views = self._views(prefill)
        self.step = ForwardStep(is_prefill, None if prefill is None else prefill.views, mask, {})

    def _hook(self, index: int):
        def before_layer(module, args, kwargs):
            views = self.step.views if self.step is not None else None
            if not views:
                return None
            starts = [k for k in views if k <= index]
            if not starts:
                return None
            return self._apply(module, index, max(starts), args, kwargs)

        return before_layer

    # -- the kept columns of each stage -----------------------------------------------------------------

    def _views(self, prefill) -> dict[int, View] | None:
        plans = [image.plan for row in prefill.images for image in row]
        if not plans or all(len(set(plan.counts)) == 1 for plan in plans):
            return None  # no in-LLM stage, or none that drops a token
        views, previous = {}, None
        for stage, start in enumerate(plans[0].layers, start=1):  # one method: every image has the same layers
            view = self._stage_view(prefill, stage, previous)
            if start in views:  # several stages start at one layer: it gathers once, from the earlier view
                view.within_previous = views[start].within_previous.gather(1, view.within_previous.clamp_min(0)).masked_fill(view.source < 0, -1)
            views[start] = view
            previous = view
        return views

    @staticmethod
    def _stage_view(prefill, stage: int, previous: View | None) -> View:
        """Text columns plus, per image, its `counts[stage]` most important surviving visual columns."""
        batch, length = prefill.prompt_mask.shape
        keep = prefill.prompt_mask.bool().clone()
        for row, images in enumerate(prefill.images):
            for image in images:
                columns = image.columns
                alive = columns if previous is None else columns[torch.isin(columns, previous.source[row])]
                weights = image.importance[torch.searchsorted(columns, alive)]
                keep[row, columns] = False
                survivors = alive[weights.argsort(descending=True, stable=True)[: image.plan.counts[stage]]]
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
        view = self.step.views[start]
        call = Call(layer, args, kwargs)
        hidden = call["hidden_states"]
        batch = hidden.shape[0]
        past = call.cache(required=True)
        if self.step.prefill:
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
            llm_mask = self.step.mask
            tail = (llm_mask[:, -generated:] if llm_mask is not None
                    else torch.ones(batch, generated, dtype=view.mask.dtype, device=hidden.device))
            mask = torch.cat([view.mask, tail.to(view.mask.dtype)], dim=1)
        built = self.step.built  # layers of one stage share their mask
        if start not in built:
            built[start] = causal_mask(self.config, hidden, mask, past, index)
        return call.update(hidden_states=hidden, attention_mask=built[start])


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, L, ...] gathered along dim 1 by index [B, L'] (-1 gives zeros)."""
    shape = (*index.shape, *values.shape[2:])
    picked = values.gather(1, index.clamp_min(0).view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    return picked.masked_fill((index < 0).view(*index.shape, *([1] * (values.dim() - 2))), 0)
