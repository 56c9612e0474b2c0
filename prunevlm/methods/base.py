"""The method interface: a method is a function of tensors that chooses which visual tokens to keep.

Methods never import transformers. They receive *signals* (named tensors gathered by a model adapter) for a
batch of images that share one token count N, and a per-image count k, and return a `Selection`.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import Budget
from ..errors import InvalidInput, InvalidOption, InvalidSignals, PruneError, Unsupported

# Every signal a method may ask for, with its shape. B images, N tokens each, L text rows. The layout signals
# are plain tuples, one per call (the images of a call share it); every other signal is a tensor.
SIGNALS: dict[str, str] = {
    "image_tokens": "[B, N, D] projected visual tokens, as the LLM receives them",
    "features": "[B, N, Dv] vision features before the projector (used for diversity; defaults to image_tokens)",
    "saliency": "[B, N] vision saliency: CLS->patch attention, or attention received where there is no CLS",
    "text_embeds": "[B, L, D] LLM input embeddings of the prompt's non-image tokens",
    "text_mask": "[B, L] bool, False for padded text rows",
    "grid": "(h, w) spatial layout of the N tokens, row-major",
    "planes": "((h, w), ...) the N tokens as row-major planes one after the other (LLaVA-NeXT: base crop, tile plane)",
    "frames": "(t, h, w) a video's N tokens as t frames of h x w, each row-major, in time order (videos only)",
    "attention": "[B, N, N] head-averaged vision attention among the N tokens (rows: queries)",
    "keys": "[B, N, d_h] the saliency layer's attention keys, averaged over heads, per token (a merge metric)",
    "patches": "[B, N, C, p, p] the (normalised) pixels under each token",
    "crop_attention": "[B, N, 2, Q] per token, within its own crop of Q tokens (LLaVA-NeXT/OneVision, packed like "
                      "the features): the attention it receives from each of them, and the attention each receives",
}

# Signals an in-LLM stage may choose from, computed by the runtime at the layer where the stage decides (its
# first layer minus `Method.decision_lead`), once per forward, for one batch row; L is that layer's sequence.
LLM_SIGNALS: dict[str, str] = {
    "last_attention": "[H, L] per-head softmax over all keys of the last prompt token's query at the deciding "
                      "layer, recomputed from that layer's q/k on its input (SDPA stays on)",
    "prior_keys": "[L, H_kv * d_h] post-RoPE keys of the layer before the deciding layer (its KV cache), heads "
                  "concatenated",
    "normed_input": "[L, D] the deciding layer's input (the previous layer's output) through the LLM's final norm",
    "layer_queries": "[H, L, d_h] the deciding layer's post-RoPE queries, times its attention scaling",
    "layer_keys": "[H, L, d_h] the deciding layer's post-RoPE keys, repeated per query head",
    "input": "[L, D] the deciding layer's input hidden states",
    "embeddings": "[L, D] the LLM's input embeddings (the first layer's input) at the deciding layer's columns",
}


LAYOUT_SIGNALS = ("grid", "planes", "frames")


class Refused(PruneError, ValueError):
    """A method, budget or budget scope that cannot run on this model as asked (a budget out of reach, stage
    layers the LLM does not allow): a refusal with what to do, not a fault. `prunevlm eval` and `bench`
    record its reason and go on; every other error stops them."""


class SignalsUnavailable(Refused, NotImplementedError):
    """The model's adapter cannot give a signal the method needs (e.g. a CLS row on a SigLIP tower)."""


@dataclass
class Selection:
    """What a method chose, per image.

    keep:    LongTensor [B, k], ascending original token indices.
    scores:  optional [B, N] ranking score (for inspection and drawing).
    tokens:  optional [B, k, D] values to place at the kept slots instead of the originals (recycled tokens).
    recycled: optional [B, k] bool, True where `tokens` holds a recycled (merged) token, not an original.
    importance: optional [B, k] importance of the kept tokens, carried to later in-LLM stages.
    info:    method-specific extras for inspection (e.g. which kept indices are "important" vs "diverse").
    """

    keep: torch.Tensor
    scores: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    recycled: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Plan:
    """Visual tokens of one image through the LLM: counts[0] from the LLM input, counts[s] from layer
    layers[s - 1] on (in-LLM stages). A method that prunes only before the LLM has one count, no layers."""

    counts: tuple[int, ...]
    layers: tuple[int, ...]
    num_layers: int

    @property
    def layer_average(self) -> float:
        """Visual tokens averaged over the LLM's layers: what the layers' KV caches hold, on average."""
        bounds = (0, *self.layers, self.num_layers)
        return sum(n * (end - start) for n, start, end in zip(self.counts, bounds, bounds[1:])) / self.num_layers


@dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options (paper defaults)."""

    name: ClassVar[str]
    description: ClassVar[str]
    signals: ClassVar[tuple[str, ...]]
    optional_signals: ClassVar[tuple[str, ...]] = ()
    prunes_in_llm: ClassVar[bool] = False  # whether its plans hold stages at LLM layers (runtime/llm_layers.py)
    # names from LLM_SIGNALS its in-LLM stages choose from (`choose`); empty: the stages keep the most
    # important survivors by the importance its `select` carried (VFlowOpt)
    llm_signals: ClassVar[tuple[str, ...]] = ()
    decision_lead: ClassVar[int] = 0  # a stage starting at layer l decides on the input of layer l - lead
    # video_scope="per_frame" calls `select_frames(budget, **signals)` once on the whole clip instead of the method
    # once per frame: the method compares frames (EVS)
    whole_clip: ClassVar[bool] = False

    @property
    def text_before_first_image(self) -> bool:
        """Whether `text_embeds` holds only the prompt's text before its first image (else all of its text)."""
        return False

    def plan(self, budget: Budget, num_tokens: int, num_layers: int) -> Plan:
        """The per-stage counts for one image of `num_tokens` tokens; here a single stage before the LLM."""
        return Plan((budget.tokens_to_keep(num_tokens),), (), num_layers)

    def __call__(self, budget: Budget, **signals) -> Selection:
        """Validate the signals, turn the budget into k tokens per image, and select them."""
        batch, num_tokens = self.check_signals(signals)
        k = budget.tokens_to_keep(num_tokens)
        if k == num_tokens:
            return self.keep_all(batch, num_tokens, **signals)
        if self.llm_signals:
            raise Unsupported(
                f"{self.name} keeps every token at the LLM input and chooses inside the LLM, from the LLM's own "
                f"signals {list(self.llm_signals)}: run it on a model with prunevlm.prune(), not on signals")
        return self.select(k, **signals)

    def keep_all(self, batch: int, num_tokens: int, **signals) -> Selection:
        """Every token, unchanged (the identity); methods that carry scores to later stages add them."""
        keep = torch.arange(num_tokens, device=_device(signals)).expand(batch, -1).clone()
        return Selection(keep=keep)

    def select(self, k: int, **signals) -> Selection:
        """Choose k < N tokens per image from validated signals."""
        raise NotImplementedError

    def select_frames(self, budget: Budget, **signals) -> Selection:
        """video_scope="per_frame" for a `whole_clip` method: every frame's count of `budget`, chosen on the
        whole clip at once (the signals' `frames` give its layout)."""
        raise NotImplementedError

    def choose(self, stage: int, count: int, columns: torch.Tensor, real: torch.Tensor, text: torch.Tensor,
               **signals) -> torch.Tensor:
        """An in-LLM stage's choice for one image of one batch row: `count` of its current visual columns
        `columns` (ascending, into the deciding layer's sequence; `real` [L] is False on padding, `text` [L]
        True on the text tokens, every image's visual tokens excluded), from the `llm_signals` of that row. Returns positions into `columns`, ascending; or (positions, slots, weights)
        where the tokens at `slots` (a subset of positions) are recycled: from the stage's first layer their
        values are `weights` [c, n] times the values of the n current tokens (the deciding layer's output)."""
        raise NotImplementedError

    def __post_init__(self):
        """Check every option against its declared type and range (`option`), before any method's own checks."""
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            if spec.init:
                setattr(self, spec.name, check_option(self.name, spec, hints[spec.name], getattr(self, spec.name)))

    @classmethod
    def options(cls) -> dict:
        """Option names and defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def option_help(cls) -> list[dict]:
        """Every option: name, type, default, allowed values, meaning (for `prunevlm methods --verbose`)."""
        hints = typing.get_type_hints(cls)
        return [{"name": f.name, "type": type_name(hints[f.name]), "default": f.default,
                 "allowed": allowed(f), "help": f.metadata.get("help", ""),
                 "calibrated": f.metadata.get("calibrated", False)}
                for f in dataclasses.fields(cls) if f.init]

    def check_signals(self, signals: dict) -> tuple[int, int]:
        """Check names, presence, shapes and finiteness; return (B, N)."""
        allowed = set(self.signals) | set(self.optional_signals)
        unknown = set(signals) - allowed
        if unknown:
            raise InvalidSignals(
                f"{self.name} does not take signal(s) {sorted(unknown)}; it needs {list(self.signals)}"
                + (f" and optionally {list(self.optional_signals)}" if self.optional_signals else "")
            )
        missing = [s for s in self.signals if signals.get(s) is None]
        if missing:
            raise InvalidSignals(f"{self.name} needs signal(s) {missing}: " + "; ".join(f"{s} = {SIGNALS[s]}" for s in missing))
        batch = num_tokens = None
        sums = {}
        for name, value in signals.items():
            if value is None or name in LAYOUT_SIGNALS:
                continue
            if not isinstance(value, torch.Tensor):
                raise InvalidSignals(f"signal {name} must be a torch.Tensor {SIGNALS[name]}, got {type(value).__name__}")
            if value.dtype.is_floating_point:  # a sum is NaN or infinite if any entry is (fp32 accumulation)
                sums[name] = value.sum(dtype=torch.float32)
            if name in ("text_embeds", "text_mask"):
                continue
            if batch is None:
                batch, num_tokens = value.shape[0], value.shape[1]
            elif value.shape[:2] != (batch, num_tokens):
                raise InvalidSignals(f"signal {name} has shape {tuple(value.shape)}, expected [B={batch}, N={num_tokens}, ...]")
        if batch is None:
            raise InvalidSignals(f"{self.name} needs at least one per-token signal to know B and N")
        # the one value a selection reads back to the host: whether every signal is finite
        if sums and not bool(torch.stack([value.to(_device(sums)) for value in sums.values()]).isfinite().all()):
            name = next(name for name, value in sums.items() if not value.isfinite())
            raise InvalidInput(f"signal {name} contains NaN or infinite values; check the model's dtype (fp16 "
                             f"overflow?) and the inputs that produced it")
        grid = signals.get("grid")
        if grid is not None and grid[0] * grid[1] != num_tokens:
            raise InvalidSignals(f"grid {tuple(grid)} holds {grid[0] * grid[1]} tokens but the signals have N={num_tokens}")
        planes = signals.get("planes")
        if planes is not None and sum(h * w for h, w in planes) != num_tokens:
            raise InvalidSignals(f"planes {tuple(planes)} hold {sum(h * w for h, w in planes)} tokens but the signals have "
                             f"N={num_tokens}")
        return batch, num_tokens


def _device(signals: dict) -> torch.device:
    for value in signals.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise to [0, 1] along `dim`; a constant row maps to zeros."""
    low = x.amin(dim, keepdim=True)
    span = x.amax(dim, keepdim=True) - low
    return (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)




def option(default, help: str, *, choices: tuple | None = None, at_least=None, above=None, at_most=None,
           calibrated: bool = False):
    """A method option: a dataclass field with its meaning and allowed values, checked by `Method.__post_init__`.

    `calibrated` marks the options a calibration search sets; a saved config must give them (config.py).
    """
    metadata = {"help": help, "choices": choices, "at_least": at_least, "above": above, "at_most": at_most,
                "calibrated": calibrated}
    return field(default=default, metadata=metadata)


def type_name(annotation) -> str:
    """'float', 'float | None', 'tuple[int, int]': the type as written in the dataclass."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def allowed(spec: dataclasses.Field) -> str:
    """The allowed values of an option in words: "one of 'a', 'b'", 'in [0, 1]', 'in (0, 1]', '> 0', or ''."""
    meta = spec.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low = f"[{meta['at_least']}" if meta.get("at_least") is not None else (
        f"({meta['above']}" if meta.get("above") is not None else None)
    high = meta.get("at_most")
    if low is not None and high is not None:
        return f"in {low}, {high}]"
    if low is not None:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    return f"<= {high}" if high is not None else ""


def check_option(method: str, spec: dataclasses.Field, annotation, value):
    """The value (a JSON list becomes a tuple), or a ValueError that names the option, what was given and what
    is allowed."""
    converted = _as_type(annotation, value)
    if converted is _WRONG:
        limits = allowed(spec)
        raise InvalidOption(f"{method}: option {spec.name} must be {type_name(annotation)}"
                         f"{' ' + limits if limits else ''}, got {value!r} ({type(value).__name__})"
                         + ("; numbers must be finite, ints within 64 bits" if isinstance(value, numbers.Number) else ""))
    if converted is None or isinstance(converted, tuple):
        return converted
    meta = spec.metadata
    outside = (
        (meta.get("choices") and converted not in meta["choices"])
        or (meta.get("at_least") is not None and not converted >= meta["at_least"])
        or (meta.get("above") is not None and not converted > meta["above"])
        or (meta.get("at_most") is not None and not converted <= meta["at_most"])
    )
    if outside:
        raise InvalidOption(f"{method}: option {spec.name} must be {allowed(spec)}, got {value!r}")
    return converted


_WRONG = object()


def _as_type(annotation, value):
    """`value` as the annotated type (bool, int, float, str, X | None, tuple[...]), or _WRONG."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _WRONG
        for arm in args:
            converted = _WRONG if arm is type(None) else _as_type(arm, value)
            if converted is not _WRONG:
                return converted
        return _WRONG
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return _WRONG
        arms = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(arms) != len(value):
            return _WRONG
        items = tuple(_as_type(arm, item) for arm, item in zip(arms, value))
        return _WRONG if any(item is _WRONG for item in items) else items
    if annotation is bool:
        return value if isinstance(value, bool) else _WRONG
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is int:  # within 64 bits, as torch holds it
        return int(value) if number and isinstance(value, numbers.Integral) and -2**63 <= value < 2**63 else _WRONG
    if annotation is float:  # finite (10**400 is no float)
        return float(value) if number and abs(value) <= sys.float_info.max else _WRONG
    if annotation is str:
        return value if isinstance(value, str) else _WRONG
    raise TypeError(f"option type {annotation!r} is not one check_option knows; add it to methods/base.py::_as_type")
