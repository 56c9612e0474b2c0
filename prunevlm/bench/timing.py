"""Timings of one configuration: the language model's prefill and each decoding step, timed by hooks;
TTFT, selection and KV cache from one-token generates; medians over rounds."""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm import tqdm

from ..budget import Budget
from ..methods import make_method
from ..methods.base import Refused
from ..models import get_adapter
from ..models.base import synchronize
from ..runtime.contract import output_cache
from .memory import attach, kv_bytes


class Stopwatch:
    """Times the language model's prefill and the whole model's decoding steps through hooks."""

    def __init__(self, model):
        self.model, self.prefill, self.steps = model, [], []
        adapter = get_adapter(model)
        lm = adapter.language_model
        self.handles = [
            lm.register_forward_pre_hook(lambda m, a, kw: self._start("lm"), with_kwargs=True),
            lm.register_forward_hook(lambda m, a, kw, out: self._stop("lm", kw), with_kwargs=True),
            model.register_forward_pre_hook(lambda m, a, kw: self._start("step"), with_kwargs=True),
            model.register_forward_hook(lambda m, a, kw, out: self._stop("step", kw), with_kwargs=True),
        ]
        self.started = {}

    def _start(self, name):
        synchronize(self.model.device)
        self.started[name] = time.perf_counter()

    def _stop(self, name, kwargs):
        synchronize(self.model.device)
        seconds = time.perf_counter() - self.started[name]
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        if name == "lm" and length > 1:
            self.prefill.append(seconds)
        elif name == "step" and length == 1:
            self.steps.append(seconds)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def measure_once(model, inputs, method: str, budget: int, decode_tokens: int, budget_scope: str = "per_image",
                 video_scope: str | None = None) -> dict:
    """One run of one (method, budget) with its pruning attached: a one-token generate (TTFT, prefill,
    selection and its signal part, KV cache), then a `decode_tokens` generate (decode ms per token; None
    with 0 decode tokens)."""
    handle = attach(model, method, budget, budget_scope, video_scope)
    watch = Stopwatch(model)
    try:
        synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        synchronize(model.device)
        ttft = time.perf_counter() - start
        run = {"ttft_ms": 1000 * ttft, "prefill_ms": 1000 * watch.prefill[-1],
               "selection_ms": handle.stats.selection_ms if handle else 0.0,
               "llm_choice_ms": handle.stats.llm_choice_ms if handle else 0.0,
               "signal_ms": handle.stats.signal_ms if handle else 0.0,
               "kv_mb": kv_bytes(output_cache(out)) / 2**20,
               "kept": handle.stats.tokens_after[0][0] if handle else visual_tokens(model, inputs)}
        del out
        run["decode_ms"] = None
        if decode_tokens:
            watch.steps.clear()
            model.generate(**inputs, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
            run["decode_ms"] = 1000 * statistics.median(watch.steps)
    finally:
        watch.remove()
        if handle:
            handle.remove()
    return run


def visual_tokens(model, inputs: dict) -> int:
    """The unpruned visual tokens of the prompt's one image or one video (its placeholders)."""
    if "pixel_values_videos" in inputs:
        return int((inputs["input_ids"] == model.config.video_token_id).sum())
    return get_adapter(model).image_token_counts(inputs)[0]


def measure(model, inputs, configs: list[tuple[str, int | None]], repeats: int, decode_tokens: int,
            budget_scope: str = "per_image", video_scope: str | None = None) -> list[dict]:
    """Median figures per (method, budget) over `repeats` rounds after a warm-up round; a budget a method
    cannot reach on this model, or a method the model's family refuses, is a row with the reason under
    "refused" (found in the warm-up round).

    Each round runs every configuration once, so a slow spell of a shared machine spreads over all of
    them instead of landing on the few measured back to back while it lasts."""
    runs = {config: [] for config in configs}
    refused = {}
    with tqdm(total=(repeats + 1) * len(configs), desc="timing", unit="run", file=sys.stderr) as progress:
        for round_ in range(repeats + 1):
            for method, budget in configs:
                progress.set_postfix_str(f"round {round_}{' (warm-up)' if not round_ else ''}: {method} {budget or ''}")
                progress.update()
                if (method, budget) in refused:
                    continue
                try:
                    run = measure_once(model, inputs, method, budget, decode_tokens, budget_scope, video_scope)
                except Refused as error:
                    refused[(method, budget)] = str(error)
                    continue
                if round_:  # round 0 warms every configuration up
                    runs[(method, budget)].append(run)
    rows = []
    for (method, budget), measured in runs.items():
        if (method, budget) in refused:
            rows.append({"method": method, "budget": budget, "refused": refused[(method, budget)]})
            continue
        row = {"method": method, "budget": budget}
        for key in measured[0]:
            row[key] = measured[0][key] if key == "kept" or measured[0][key] is None else \
                statistics.median(r[key] for r in measured)
        rows.append(row)
    return rows


@torch.inference_mode()
def selection_per_image(signals: dict, methods: list[str], budgets: list, batches: tuple[int, ...], repeats: int,
                        num_layers: int) -> list[dict]:
    """The method's selection alone, outside the model, on `signals` (a batch of at least max(batches)
    images): per (method, budget), the median ms per image of one call on `batch` images, for each batch
    size. k is the method's count at the LLM input (vflowopt: its stage 0). Methods that choose inside the
    LLM (`llm_signals`) or need a signal not given are left out: only the pipeline times them. Rounds run
    every configuration once, after a warm-up round, as `measure` does."""
    device = signals["image_tokens"].device
    num_tokens = signals["image_tokens"].shape[1]
    configs = []
    for name in methods:
        method = make_method(name)
        if method.llm_signals or not set(method.signals) <= set(signals):
            continue
        taken = {key: value for key, value in signals.items() if key in method.signals + method.optional_signals}
        for budget in budgets:
            k = method.plan(Budget.of(budget), num_tokens, num_layers).counts[0]
            for batch in batches:
                part = {key: value if key == "grid" else value[:batch] for key, value in taken.items()}
                configs.append((name, budget, batch, method, Budget(k), part))
    times = {config[:3]: [] for config in configs}
    for round_ in range(repeats + 1):
        for name, budget, batch, method, k, part in configs:
            synchronize(device)
            start = time.perf_counter()
            method(k, **part)
            synchronize(device)
            if round_:
                times[(name, budget, batch)].append(time.perf_counter() - start)
    rows = {}
    for (name, budget, batch), measured in times.items():
        row = rows.setdefault((name, budget), {"method": name, "budget": budget})
        row[f"batch_{batch}_ms_per_image"] = 1000 * statistics.median(measured) / batch
    return list(rows.values())
