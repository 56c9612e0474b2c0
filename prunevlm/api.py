"""The public API: prune(), select(), list_methods()."""

from __future__ import annotations

from torch import nn

from .budget import Budget, check_budget_scope, check_video_scope
from .config import load_config
from .errors import HandleConflict, InvalidBudget, InvalidConfig
from .methods import METHODS, SIGNALS, Method, Selection, make_method
from .models import get_adapter
from .runtime.contract import warn_if_untested
from .runtime.llm_input import InputPruning, Stats

_ATTACHED = "_prunevlm_handle"


class PruneHandle:
    """A pruning method attached to a model through hooks. Use as a context manager or call `.remove()`.

    One handle per model (its generation class and `.model` count as one); a model under a handle cannot be
    deep-copied. Several threads may generate through one handle: the model's forwards then run one at a
    time, and `stats` is each thread's own (docs/architecture.md)."""

    def __init__(self, model: nn.Module, method: Method, budget: Budget, positions: str, newline: str,
                 budget_scope: str, video_scope: str = "per_frame"):
        self.model, self.method, self.budget, self.budget_scope = model, method, budget, budget_scope
        self.video_scope = check_video_scope(video_scope)
        self.adapter = get_adapter(model)
        # marked on the base model, which the generation class and its .model share: one handle for both
        existing = getattr(self.adapter.base, _ATTACHED, None)
        if existing is not None:
            raise HandleConflict(f"{existing!r} is already attached to this model (or to the model it wraps, or to its "
                               f".model); call .remove() on it first")
        method.plan(Budget(1.0), 1, self.adapter.num_layers)  # refuses stage layers this LLM lacks (docs/errors.md)
        warn_if_untested()
        self.runtime = InputPruning(self.adapter, method, budget, positions, newline, budget_scope, video_scope)
        setattr(self.adapter.base, _ATTACHED, self)

    @property
    def stats(self) -> Stats:
        """The calling thread's last prefill: visual tokens before/after per image (a video counts as one
        image; `videos` gives its frames), the tokens each image's budget granted, prompt lengths, selection
        time, and `input_columns`, the input column each position of
        the returned sequence holds (docs/architecture.md, what a forward returns)."""
        return self.runtime.stats

    @property
    def attached(self) -> bool:
        return getattr(self.adapter.base, _ATTACHED, None) is self

    def draw(self, inputs: dict, processor, path: str | None = None):
        """A picture of the last prefill's kept tokens: each image of `inputs` (the processor's output that
        was generated from; `processor` made it) as the model saw it, beside the same picture with the pruned
        tokens darkened and hatched and recycled ones outlined, at its own aspect ratio, under a legend, with
        its row, its place in the row and what its count means; each video as a film strip, every frame
        beside its kept tokens. Saved to `path` if given (an image file name
        such as kept.png; its folder is created); returns the PIL image."""
        from .viz import kept_tokens_picture

        scope = self.budget_scope.replace("_", " ")
        if inputs.get("pixel_values_videos") is not None:
            scope += f"; videos {self.video_scope.replace('_', ' ')}"
        title = f"{self.method.name} at budget {self.budget} ({scope})"
        return kept_tokens_picture(self.adapter, inputs, processor, self.stats, path, title)

    def remove(self) -> None:
        """Detach every hook; the model is exactly as it was."""
        if self.attached:
            self.runtime.remove()
            delattr(self.adapter.base, _ATTACHED)

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (f"PruneHandle({self.method!r}, budget={self.budget!r}, budget_scope={self.budget_scope!r}, "
                f"video_scope={self.video_scope!r}, {self.adapter.family}, {state})")


def resolve(method: str | Method | None = None, budget: int | float | Budget | None = None, config=None,
            options: dict | None = None, budget_scope: str | None = None,
            video_scope: str | None = None) -> tuple[Method, Budget, str, str]:
    """The method instance, budget, budget scope and video scope `prune` attaches, from its arguments, checked
    without a model (so a caller about to load one can refuse bad settings first): a config's method, budget,
    scopes and options must agree with the ones given. No method or scope given: the config's, else
    "flashvlm", "per_image" and "per_frame"."""
    options = dict(options or {})
    budget = None if budget is None else Budget.of(budget)
    if budget_scope is not None:
        check_budget_scope(budget_scope)
    if video_scope is not None:
        check_video_scope(video_scope)
    if config is not None:
        loaded = load_config(config)
        method = loaded["method"] if method is None else method
        name = method if isinstance(method, str) else method.name
        if name != loaded["method"]:
            raise InvalidConfig(f"the config is for {loaded['method']!r}, not {name!r}: give method "
                                f"{loaded['method']!r} or none (the config's is then taken)")
        overlap = set(options) & set(loaded["options"])
        if overlap:
            raise InvalidConfig(f"options {sorted(overlap)} are set by the config; edit the config or drop them here")
        if budget is not None and budget != loaded["budget"]:
            raise InvalidConfig(
                f"the config was calibrated for budget {loaded['budget']}; pass that budget (or none), or "
                f"calibrate for {budget}"
            )
        for scope, given in (("budget_scope", budget_scope), ("video_scope", video_scope)):
            if given is not None and given != loaded[scope]:
                raise InvalidConfig(f"the config was calibrated with {scope}={loaded[scope]!r}; pass that (or none), "
                                    f"or calibrate with {given!r}")
        budget, options = loaded["budget"], {**loaded["options"], **options}
        budget_scope, video_scope = loaded["budget_scope"], loaded["video_scope"]
    if budget is None:
        raise InvalidBudget("prune() needs a budget: tokens per image (int) or a fraction of each image (float in (0, 1])")
    method = make_method("flashvlm" if method is None else method, **options)
    return method, budget, budget_scope or "per_image", video_scope or "per_frame"


def prune(model: nn.Module, method: str | Method | None = None, budget: int | float | Budget | None = None, *,
          config=None, positions: str = "original", newline: str = "drop", budget_scope: str | None = None,
          video_scope: str | None = None, **options) -> PruneHandle:
    """Attach a pruning method to a stock Hugging Face VLM: `method` (a name or a Method; default the config's,
    else "flashvlm") with its options.

    budget: an int (Python or NumPy) is the number of visual tokens kept per image (an image with fewer stays
    whole); a float in (0, 1] is the fraction of each image's tokens; a `Budget` is either. For methods that
    prune inside the LLM (vflowopt) it is the layer-averaged count or fraction. config: a saved configuration
    (path or dict, e.g. from `prunevlm calibrate`) giving the method's options and budget. positions:
    "original" keeps the kept tokens' RoPE positions (required for M-RoPE), "compact" renumbers them.
    newline: what becomes of LLaVA-NeXT/OneVision row newlines, which never compete for the budget: "drop"
    (as the published NeXT numbers were produced), "keep_nonempty_rows" or "keep_all"; an image kept whole
    keeps them all (no effect on families without newlines). budget_scope: "per_image" (the default, or the
    config's) counts the budget over all of an image's crops (an int: the image's tokens reaching the LLM; a
    float: the fraction of all its placeholders, newlines included); "per_crop" counts it in each crop, on the
    crop's unpadded tokens, and the method selects within each crop (LLaVA-NeXT/OneVision; the same as
    per_image for families with one crop per image; docs/models.md §3). video_scope: how the budget counts on
    a video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision; docs/models.md §7): "per_frame" (the default,
    or the config's) in each frame the model encodes (an int keeps min(k, its tokens) of every frame, a float that fraction of
    each frame), "per_clip" over the whole video (an int keeps min(k, the video's tokens), a float that
    fraction of them; frames compete and a frame may keep none). Other keyword arguments are method options.
    """
    method, budget, budget_scope, video_scope = resolve(method, budget, config, options, budget_scope, video_scope)
    return PruneHandle(model, method, budget, positions, newline, budget_scope, video_scope)


def select(method: str | Method, budget: int | float | Budget, **kwargs) -> Selection:
    """Run a method on signals directly: `select("flashvlm", 64, image_tokens=..., saliency=..., text_embeds=...)`.

    Keyword arguments named like a signal (see `list_methods()`) are signals; the rest are method options.
    Returns a `Selection` whose `.keep` is a LongTensor [B, k] of ascending original indices.
    """
    budget = Budget.of(budget)
    signals = {name: kwargs.pop(name) for name in list(kwargs) if name in SIGNALS}
    return make_method(method, **kwargs)(budget, **signals)


def list_methods() -> list[dict]:
    """Every method: name, description, required and optional signals, options with their defaults, and per
    option its type, allowed values and meaning (`option_help`)."""
    return [
        {
            "name": name,
            "description": cls.description,
            "signals": list(cls.signals),
            "optional_signals": list(cls.optional_signals),
            "options": cls.options(),
            "option_help": cls.option_help(),
        }
        for name, cls in METHODS.items()
    ]
