"""Progressive pruning inside the LLM (the in-LLM stages of each image's `Plan`, e.g. VFlowOpt's at k1 and
k2, docs/vflowopt.md §3.2), through decoder-layer pre-hooks only (docs/transformers.md §1, pruning inside
the LLM), so SDPA/FlashAttention stay on.

At prefill, the layer where stage s starts receives the previous stage's sequence and keeps the text plus
each image's counts[s] most important visual tokens (the importance carried from the selection). The text model hands the
full-length position embeddings, position ids and mask to every layer, so each layer from k1 on gets them
gathered to its view; its KV cache then holds only the survivors. While decoding, each such layer gets a
mask sized to its own, shorter cache. Rows are re-padded on the left; masks are rebuilt from the 2D padding
mask with transformers' own `create_causal_mask`, sized against the layer's cache.

Stages rank either by the importance the method's selection carried (VFlowOpt: every view is known when the
prefill starts) or, for a method that declares `llm_signals`, by its `choose` on signals of the LLM itself
(FastV, PyramidDrop, DART): such a stage's view is built during the prefill, at its deciding layer (its first
layer minus `decision_lead`), from signals computed there once for the batch on that layer's input.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..methods.base import Refused
from ..models.base import synchronize
from .contract import Call, causal_mask, layer_cache_length, layer_keys


@dataclass
class View:
    """The prompt columns a stage keeps: indices into the stage-0 sequence (-1 for left padding)."""

    source: torch.Tensor  # [B, L_s]
    mask: torch.Tensor  # [B, L_s] 1 for real tokens
    within_previous: torch.Tensor  # [B, L_s] index into the previous stage's view (for the hidden states)
    # recycled tokens: (row, slots in this view [c], weights [c, n], their sources in the previous view [n]);
    # from the stage's first layer the slots hold those weighted sums of the previous layer's outputs
    merges: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class ForwardStep:
    """One forward of the language model, as its decoder-layer hooks need it."""

    prefill: bool
    views: dict[int, View] | None  # from the prefill this forward belongs to
    mask: torch.Tensor | None  # the language model's 2D mask (the pruned prompt, then the generated tokens)
    built: dict[int, object]  # stage-start layer -> the causal mask built for its layers in this forward
    decisions: dict[int, tuple[int, int]]  # prefill, LLM-signal stages: deciding layer -> (stage, start layer)
    embeddings: torch.Tensor | None = None  # prefill, LLM-signal stages: the first layer's input


class LayerPruning:
    """Decoder-layer hooks that run the in-LLM stages of each image's `Plan`; `InputPruning` starts each
    forward of the language model with `begin_forward`, after pruning its input."""

    def __init__(self, adapter, method):
        adapter.check_llm_signals(method.llm_signals)
        self.adapter, self.method = adapter, method
        self.config = adapter.language_model.config
        self.step: ForwardStep | None = None
        self.prefill = self.stats = None
        self.handles = [layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)
                        for index, layer in enumerate(adapter.decoder_layers())]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.step, self.prefill, self.stats = [], None, None, None

    def begin_forward(self, prefill, is_prefill: bool, mask: torch.Tensor | None, stats) -> None:
        """`prefill`: the last pruned prefill's record (None: nothing pruned in this generation); at a prefill
        its stage views are computed once (or, for LLM-signal stages, at their deciding layers) and kept on it
        for the decoding steps. The time spent building views is added to `stats` (the prefill's `Stats`)."""
        decisions = {}
        self.prefill, self.stats = prefill, stats
        if prefill is not None and is_prefill:
            with self._timed(prefill.prompt_mask.device):
                prefill.views, decisions = self._views(prefill)
        self.step = ForwardStep(is_prefill, None if prefill is None else prefill.views, mask, {}, decisions)

    def _hook(self, index: int):
        def before_layer(module, args, kwargs):
            views = self.step.views if self.step is not None else None
            if views is None:
                return None
            if self.step.prefill and self.step.decisions and index == 0:
                self.step.embeddings = (args or (kwargs["hidden_states"],))[0]
            if self.step.prefill and index in self.step.decisions:
                with self._timed(self.prefill.prompt_mask.device):
                    self._decide(module, index, args, kwargs)
            starts = [k for k in views if k <= index]
            if not starts:
                return None
            return self._apply(module, index, max(starts), args, kwargs)

        return before_layer

    @contextlib.contextmanager
    def _timed(self, device: torch.device):
        """Adds the block's wall time (device work included) to the prefill's selection and in-LLM choice times."""
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        milliseconds = 1000 * (time.perf_counter() - start)
        self.stats.selection_ms += milliseconds
        self.stats.llm_choice_ms += milliseconds

    # -- the kept columns of each stage -----------------------------------------------------------------

    def _views(self, prefill) -> tuple[dict[int, View] | None, dict[int, tuple[int, int]]]:
        """The views known at the start of the prefill, and the stages still to decide (deciding layer ->
        (stage, start layer))."""
        plans = [image.plan for row in prefill.images for image in row]
        if not plans or all(len(set(plan.counts)) == 1 for plan in plans):
            return None, {}  # no in-LLM stage, or none that drops a token
        layers = plans[0].layers  # one method: every image has the same layers
        if self.method.llm_signals:
            lead = self.method.decision_lead
            if any(b - lead < a for a, b in zip((0, *layers), layers)) or layers[0] < lead:
                raise Refused(f"{self.method.name}: stage layers {layers} leave no deciding layer {lead} layer(s) "
                              f"before each stage, after the previous one")
            return {}, {start - lead: (stage, start) for stage, start in enumerate(layers, start=1)}
        views, previous = {}, None
        for stage, start in enumerate(layers, start=1):
            view = self._stage_view(prefill, stage, previous, _by_importance(stage))
            if start in views:  # several stages start at one layer: it gathers once, from the earlier view
                view.within_previous = views[start].within_previous.gather(1, view.within_previous.clamp_min(0)).masked_fill(view.source < 0, -1)
            views[start] = view
            previous = view
        return views, {}

    def _decide(self, layer, index: int, args, kwargs) -> None:
        """Build the view of the stage that decides at this layer, from the method's `choose` on the LLM
        signals of this layer's input (computed once for the batch)."""
        stage, start = self.step.decisions[index]
        views = self.step.views
        current = views[max(k for k in views if k <= index)] if any(k <= index for k in views) else None
        call = Call(layer, args, kwargs)
        hidden, embeddings = call["hidden_states"], call["position_embeddings"]
        batch = hidden.shape[0]
        if current is None:
            real = self.prefill.prompt_mask.bool()
        else:
            if index in views:  # the stage's first layer gathers its input from the previous view
                hidden = _stage_input(hidden, current)
            embeddings = tuple(_gather(e.expand(batch, -1, -1), current.source) for e in embeddings)
            real = current.mask.bool()
        names = self.method.llm_signals
        signals = {}
        if "last_attention" in names:
            signals["last_attention"] = self.adapter.last_attention(index, hidden, embeddings, real)
        if "prior_keys" in names:
            keys = layer_keys(call.cache(required=True), index - 1) if index > 0 else None
            if keys is None or keys.shape[-2] != hidden.shape[1]:
                raise Refused(f"{self.method.name}: the layer before the deciding layer {index} must run on the same "
                              f"sequence (no stage may start at the deciding layer): set the stage layers further apart")
            signals["prior_keys"] = keys.transpose(1, 2).flatten(2)
        if "normed_input" in names:
            signals["normed_input"] = self.adapter.final_norm(hidden)
        if "layer_queries" in names or "layer_keys" in names:
            signals["layer_queries"], signals["layer_keys"] = self.adapter.queries_and_keys(index, hidden, embeddings)
        if "input" in names:
            signals["input"] = hidden
        if "embeddings" in names:
            first = self.step.embeddings
            signals["embeddings"] = first if current is None else _gather(first, current.source)
        text = real.clone()
        for row, images in enumerate(self.prefill.images):
            for image in images:
                text[row, self._current(image, row, current)[1]] = False
        merges = []

        def by_choice(row, image, alive):
            count = image.plan.counts[stage]
            if count >= alive.numel():
                return alive
            at = self._current(image, row, current)[1]
            choice = self.method.choose(stage, count, at, real[row], text[row],
                                        **{name: value[row] for name, value in signals.items()})
            if isinstance(choice, tuple):  # positions, and the recycled ones: slots and weights over `at`
                choice, slots, weights = choice
                merges.append((row, alive[slots], weights, at))
            return alive[choice]

        view = self._stage_view(self.prefill, stage, current, by_choice)
        view.merges = [(row, torch.searchsorted(view.source[row], slots), weights, at)
                       for row, slots, weights, at in merges]
        views[start] = view

    @staticmethod
    def _current(image, row: int, current: View | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's columns that reached the view `current` (as stage-0 columns), and where they sit in it."""
        if current is None:
            return image.columns, image.columns
        alive = image.columns[torch.isin(image.columns, current.source[row])]
        return alive, torch.searchsorted(current.source[row], alive)

    @staticmethod
    def _stage_view(prefill, stage: int, previous: View | None, survivors) -> View:
        """Text columns plus, per image, the visual columns `survivors(row, image, alive)` keeps of those that
        reached this stage (`alive`, ascending, as columns of the stage-0 sequence)."""
        batch, length = prefill.prompt_mask.shape
        keep = prefill.prompt_mask.bool().clone()
        for row, images in enumerate(prefill.images):
            for image in images:
                columns = image.columns
                alive = columns if previous is None else columns[torch.isin(columns, previous.source[row])]
                keep[row, columns] = False
                keep[row, survivors(row, image, alive)] = True
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
                hidden = _stage_input(hidden, view)
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


def _stage_input(hidden: torch.Tensor, view: View) -> torch.Tensor:
    """The first layer of a stage: the previous layer's outputs gathered to the view, recycled slots merged."""
    gathered = _gather(hidden, view.within_previous)
    for row, slots, weights, sources in view.merges:
        gathered[row, slots] = (weights @ hidden[row, sources].float()).to(hidden.dtype)
    return gathered


def _by_importance(stage: int):
    """Survivors of a stage: each image's `counts[stage]` most important surviving columns, by the importance
    its selection carried."""
    def survivors(row: int, image, alive: torch.Tensor) -> torch.Tensor:
        weights = image.importance[torch.searchsorted(image.columns, alive)]
        return alive[weights.argsort(descending=True, stable=True)[: image.plan.counts[stage]]]

    return survivors


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, L, ...] gathered along dim 1 by index [B, L'] (-1 gives zeros)."""
    shape = (*index.shape, *values.shape[2:])
    picked = values.gather(1, index.clamp_min(0).view(*index.shape, *([1] * (values.dim() - 2))).expand(shape))
    return picked.masked_fill((index < 0).view(*index.shape, *([1] * (values.dim() - 2))), 0)
