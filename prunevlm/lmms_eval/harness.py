"""What the lmms-eval model class does, without importing lmms-eval (so that the project's own tests run it):
read `--model_args`, load the model with from_pretrained and attach the pruning, answer batches of prompts
with `generate`, score continuations, and report per row what the pruning did. A row's visuals are images
and video files (paths, as lmms-eval's video tasks give them), decoded by `loading.read_video`."""

from __future__ import annotations

import dataclasses
import json

import torch

from .. import prune
from ..api import resolve
from ..budget import Budget
from ..config import load_config
from ..loading import VIDEO_FRAMES, load, prompt_inputs, read_video, resolve_dtype, with_processor_normalisation
from ..methods import Method
from ..models import get_adapter
from ..errors import InvalidInput, InvalidSetting

OPTION_PREFIX = "option_"
# Every model_arg, with its meaning (the errors list them). All of them are in lmms-eval's response-cache key.
MODEL_ARGS = {
    "pretrained": "hub id or local folder of a supported VLM (from_pretrained)",
    "method": "a pruning method (prunevlm methods), or none for the unpruned model",
    "budget": "tokens kept per image (int) or fraction of each image (float in (0, 1]); the config's if omitted",
    "config": "a saved configuration, e.g. from prunevlm calibrate (method options and budget)",
    "budget_scope": "per_image (the default, or the config's) or per_crop (LLaVA-NeXT/OneVision: the budget counts "
                    "in each crop)",
    "video_scope": "per_frame (the default, or the config's) or per_clip: the budget counts in each frame of a video "
                   "or over the whole video (Qwen2-VL/2.5-VL/3-VL, LLaVA-OneVision)",
    "video_frames": f"frames sampled evenly from each video file (default {VIDEO_FRAMES})",
    f"{OPTION_PREFIX}NAME": "a method option, e.g. option_eta=0.3 (prunevlm methods --verbose lists them)",
    "positions": "RoPE positions of kept tokens: original (required for Qwen's M-RoPE) or compact",
    "dtype": "auto (the checkpoint's), float32, bfloat16 or float16",
    "attn": "attn_implementation of the model (default sdpa)",
}
DEFAULT_MAX_NEW_TOKENS = 256  # when neither the task nor the model's generation config sets one


@dataclasses.dataclass(frozen=True)
class Settings:
    pretrained: str
    method: Method | None  # None: the unpruned model
    budget: Budget | None
    budget_scope: str = "per_image"
    video_scope: str = "per_frame"
    video_frames: int = VIDEO_FRAMES
    positions: str = "original"
    dtype: str = "auto"
    attn: str = "sdpa"
    given: tuple = ()  # the option names set by model_args and by the config it names


def parse_model_args(args: dict) -> Settings:
    """Settings from lmms-eval's parsed `--model_args` (values arrive as int, float, bool or str), every one
    checked before a model is loaded. `method` is required, so that a cache key never stands for a default
    that a later release may change."""
    args = dict(args)
    options = {}
    for key in [k for k in args if k.startswith(OPTION_PREFIX)]:
        options[key[len(OPTION_PREFIX):]] = _option_value(args.pop(key))
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise InvalidSetting(f"unknown model_args {unknown}; prunevlm takes " +
                         "; ".join(f"{name}: {meaning}" for name, meaning in MODEL_ARGS.items()))
    for name in ("pretrained", "method"):
        if not isinstance(args.get(name), str) or not args[name]:
            raise InvalidSetting(f"model_args needs {name}=... ({MODEL_ARGS[name]}), got {args.get(name)!r}")
    positions = args.get("positions", "original")
    if positions not in ("original", "compact"):
        raise InvalidSetting(f"positions must be original or compact, got {positions!r}")
    dtype = str(args.get("dtype", "auto"))
    resolve_dtype(dtype)
    video_frames = args.get("video_frames", VIDEO_FRAMES)
    if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
        raise InvalidSetting(f"video_frames must be an int >= 1 ({MODEL_ARGS['video_frames']}), got {video_frames!r}")
    common = {"pretrained": args["pretrained"], "positions": positions, "dtype": dtype, "attn": str(args.get("attn", "sdpa")),
              "video_frames": video_frames}
    budget = args.get("budget")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if args["method"] == "none":
        given = [name for name in ("budget", "config", "budget_scope", "video_scope") if name in args] + [f"{OPTION_PREFIX}{o}" for o in options]
        if given:
            raise InvalidSetting(f"method=none is the unpruned model: drop {', '.join(given)}")
        return Settings(method=None, budget=None, **common)
    method, budget, budget_scope, video_scope = resolve(args["method"], budget, args.get("config"), options,
                                                        args.get("budget_scope"), args.get("video_scope"))
    loaded = load_config(args["config"]) if args.get("config") else None
    given = (*options, *(loaded["options"] if loaded else ()))
    return Settings(method=method, budget=budget, budget_scope=budget_scope, video_scope=video_scope, given=given,
                    **common)


def _option_value(value):
    """lmms-eval hands over numbers and booleans already converted; lists and objects arrive as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


class PrunedModel:
    """A VLM loaded with `prunevlm.loading.load`, with the settings' pruning attached for its lifetime."""

    def __init__(self, settings: Settings, device: str):
        self.settings = settings
        self.model, self.processor = load(settings.pretrained, settings.dtype, device, settings.attn)
        self.adapter = get_adapter(self.model)
        self.handle = None
        if settings.method is not None:
            method = with_processor_normalisation(settings.method, self.processor, settings.given)
            self.handle = prune(self.model, method, settings.budget, positions=settings.positions,
                                budget_scope=settings.budget_scope, video_scope=settings.video_scope)

    def _inputs(self, visuals: list, texts: list[str]) -> dict:
        """The batch of `visuals[i]` (None, or images and video paths: the images first, then the videos, as
        prompt_inputs places them) and `texts[i]`, pixels in the model's dtype."""
        images = [None if entry is None else [v for v in entry if not isinstance(v, str)] or None for entry in visuals]
        videos = [None if entry is None else [read_video(v, self.settings.video_frames) for v in entry
                                              if isinstance(v, str)] or None for entry in visuals]
        inputs = prompt_inputs(self.processor, images, texts, self.model.device, videos)
        for key, value in inputs.items():
            if key.startswith("pixel_values") and value.is_floating_point():
                inputs[key] = value.to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def generate(self, images: list, texts: list[str], gen_kwargs: dict) -> tuple[list[str], list[dict]]:
        """Answers to one left-padded batch (`images[i]`: images and video paths, or None, for row i) under
        lmms-eval's generation kwargs, each cut at the first of its `until` strings; and `row_stats` per row."""
        until, kwargs = generation_kwargs(gen_kwargs, self.model.generation_config)
        inputs = self._inputs(images, texts)
        output = self.model.generate(**inputs, **kwargs)
        new = output[:, inputs["input_ids"].shape[1]:]
        answers = [cut(text, until) for text in self.processor.batch_decode(new, skip_special_tokens=True)]
        pad = self.model.generation_config.pad_token_id
        generated = (new != pad).sum(dim=1).tolist() if pad is not None else [new.shape[1]] * len(answers)
        stats = self.row_stats(inputs, images)
        for row, count in zip(stats, generated):
            row["output_tokens"] = int(count)
        return answers, stats

    def row_stats(self, inputs: dict, images: list) -> list[dict]:
        """Per row of the last prefill: visual tokens per image before and after pruning (and averaged over the
        LLM's layers), prompt tokens before and after, and the row's share of the batch's selection time."""
        rows = inputs["input_ids"].shape[0]
        if self.handle is None:
            counts = self.adapter.image_token_counts(inputs)
            per_row, start = [], 0
            for entry in images:  # images only: the unpruned counts leave videos out
                n = 0 if entry is None else sum(not isinstance(v, str) for v in entry)
                per_row.append(counts[start:start + n])
                start += n
            prompts = inputs["attention_mask"].sum(dim=1).tolist()
            return [{"visual_tokens": c, "visual_tokens_kept": c, "layer_average": [float(n) for n in c],
                     "prompt_tokens": p, "prompt_tokens_kept": p, "selection_ms": 0.0} for c, p in zip(per_row, prompts)]
        stats = self.handle.stats
        step = len(stats.tokens_before) // rows  # beam search expands each row before the prefill
        average = stats.layer_average
        return [{"visual_tokens": stats.tokens_before[r], "visual_tokens_kept": stats.tokens_after[r],
                 "layer_average": average[r], "prompt_tokens": stats.prefill_before[r],
                 "prompt_tokens_kept": stats.prefill_after[r], "selection_ms": stats.selection_ms / rows}
                for r in range(0, rows * step, step)]

    @torch.inference_mode()
    def loglikelihood(self, images: list, contexts: list[str], continuations: list[str]) -> list[tuple[float, bool]]:
        """Per row: the mean negative log-likelihood per token of the continuation given the images and the
        context, and whether greedy decoding would produce it. The mean loss, not the log-probability lmms-eval's
        base class describes, is what its multiple-choice scoring takes the argmin of and what its own HF models
        return. Each continuation is tokenised on its own and forced through `generate` after the chat
        template's answer prompt, so the visual tokens are selected from the images and context alone, as when
        answering (a forward over context + continuation would let a text-guided method see the candidate)."""
        inputs = self._inputs(images, contexts)
        tokenizer = self.processor.tokenizer
        targets = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
        empty = [text for text, ids in zip(continuations, targets) if not ids]
        if empty:
            raise InvalidInput(f"continuation(s) {empty!r} have no tokens")
        length = inputs["input_ids"].shape[1]

        def force(row: int, ids: torch.Tensor) -> list[int]:  # a finished row repeats its last token (ignored)
            target = targets[row]
            return [target[min(ids.shape[0] - length, len(target) - 1)]]

        output = self.model.generate(**inputs, max_new_tokens=max(map(len, targets)),
                                     do_sample=False, num_beams=1, prefix_allowed_tokens_fn=force,
                                     output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(output.logits, dim=1).float()  # [B, steps, V], before any logits processor
        results = []
        for row, target in enumerate(targets):
            target = torch.tensor(target, device=logits.device)
            scores = logits[row, : len(target)]
            loss = -torch.log_softmax(scores, dim=-1).gather(-1, target[:, None]).mean()
            results.append((float(loss), bool((scores.argmax(dim=-1) == target).all())))
        return results

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def generation_kwargs(gen_kwargs: dict, generation_config) -> tuple[list[str], dict]:
    """(stop strings, `generate` keywords) from an lmms-eval request's generation kwargs: greedy unless the
    task asks for sampling (do_sample, or a temperature > 0)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = gen_kwargs.get("max_new_tokens", gen_kwargs.get("max_gen_toks"))
    kwargs = {"max_new_tokens": int(max_new or generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
              "num_beams": int(gen_kwargs.get("num_beams") or 1)}
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") or temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature or 1.0)
        if gen_kwargs.get("top_p") is not None:
            kwargs["top_p"] = float(gen_kwargs["top_p"])
    else:
        kwargs["do_sample"] = False
    return until, kwargs


def cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
