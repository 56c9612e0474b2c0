"""The hook contract with transformers: a changed contract raises, it never runs unpruned or half-pruned."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from torch import nn

import prunevlm
import tiny
from prunevlm.runtime import contract
from prunevlm.runtime.contract import CACHE_KEYWORDS, ContractError, cache_keyword, output_cache
from test_runtime import FAMILIES, GENERATE


@pytest.fixture(params=list(FAMILIES))
def case(request):
    make, inputs = FAMILIES[request.param]
    return make(), inputs()


def rename_cache_keyword(model, new_name: str):
    """Simulate a release that passes the language model its cache under another name (registered before
    the pruning hooks, so they see the renamed call)."""

    def rename(module, args, kwargs):
        for name in CACHE_KEYWORDS:
            if name in kwargs:
                kwargs[new_name] = kwargs.pop(name)
        return args, kwargs

    return model.model.language_model.register_forward_pre_hook(rename, with_kwargs=True, prepend=True)


@torch.no_grad()
def test_a_cache_under_an_unknown_name_raises(case):
    model, inputs = case
    with prunevlm.prune(model, "flashvlm", budget=3):
        rename = rename_cache_keyword(model, "kv_cache")
        with pytest.raises(ContractError, match="'kv_cache'.*transformers 5\\.") as raised:
            model.generate(**inputs, **GENERATE)  # generate passes a DynamicCache from the first step
        assert "supported: transformers" in str(raised.value)
        with pytest.raises(ContractError, match="without a cache keyword"):
            model(**inputs)  # a plain forward passes cache=None, renamed away
        rename.remove()


class Bypass(nn.Module):
    """Simulates a release whose VLM runs the text model without calling it as a module (no hooks fire)."""

    def __init__(self, language_model):
        super().__init__()
        self.inner = language_model

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)


@torch.no_grad()
def test_images_that_never_reach_the_pruning_hook_raise(case):
    model, inputs = case
    with prunevlm.prune(model, "flashvlm", budget=3):
        language_model = model.model.language_model
        model.model.language_model = Bypass(language_model)
        try:
            with pytest.raises(ContractError, match="never received them"):
                model(**inputs)
        finally:
            model.model.language_model = language_model


@torch.no_grad()
def test_a_decoding_step_on_another_cache_raises(case):
    model, inputs = case
    with prunevlm.prune(model, "flashvlm", budget=3):
        out = model(**inputs, use_cache=True)
        copied = copy.deepcopy(output_cache(out))
        step = out.logits[:, -1:].argmax(dim=-1)
        extra = {"mm_token_type_ids": torch.zeros_like(step)} if "mm_token_type_ids" in inputs else {}
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        with pytest.raises(prunevlm.HandleConflict, match="no prefill under this pruning handle produced"):
            model(input_ids=step, attention_mask=mask, use_cache=True, **{cache_keyword(model): copied}, **extra)


@torch.no_grad()
def test_a_cache_shorter_than_the_pruned_prefill_raises(case):
    model, inputs = case
    with prunevlm.prune(model, "flashvlm", budget=3):
        out = model(**inputs, use_cache=True)
        cache = output_cache(out)
        cache.crop(-2)
        step = out.logits[:, -1:].argmax(dim=-1)
        extra = {"mm_token_type_ids": torch.zeros_like(step)} if "mm_token_type_ids" in inputs else {}
        with pytest.raises(ContractError, match="fewer than"):
            model(input_ids=step, use_cache=True, **{cache_keyword(model): cache}, **extra)


@torch.no_grad()
def test_a_prefill_cache_longer_than_what_was_kept_raises(case):
    model, inputs = case

    def grow(module, args, kwargs, output):  # runs before the pruning hook's check of the cache
        cache = output_cache(output)
        for index, layer in enumerate(cache.layers):
            cache.update(layer.keys[:, :, :1], layer.values[:, :, :1], index)

    with prunevlm.prune(model, "flashvlm", budget=3):
        hook = model.model.language_model.register_forward_hook(grow, with_kwargs=True, prepend=True)
        with pytest.raises(ContractError, match="left .* in the language model's cache"):
            model(**inputs, use_cache=True)
        hook.remove()


@torch.no_grad()
def test_stats_describe_the_prefill_after_generate(case):
    model, inputs = case
    with prunevlm.prune(model, "vflowopt", budget=0.5, layers=(1, 1)) as handle:
        model(**inputs)
        after_forward = (handle.stats.prefill_before, handle.stats.prefill_after, handle.stats.tokens_after)
        model.generate(**inputs, **GENERATE)
        assert (handle.stats.prefill_before, handle.stats.prefill_after, handle.stats.tokens_after) == after_forward
        assert handle.stats.selection_ms > 0
        assert handle.stats.prefill_after != handle.stats.prefill_before


@torch.no_grad()
def test_a_static_cache_is_refused(case):
    model, inputs = case
    with prunevlm.prune(model, "flashvlm", budget=3):
        with pytest.raises(NotImplementedError, match="dynamic KV cache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static", **tiny.GREEDY)


@pytest.fixture
def transformers_messages(monkeypatch):
    """Every message transformers logs through `warning_once` (a logger method cached per message, so a
    message printed by an earlier test would not print again: recorded before that cache)."""
    from transformers.utils import generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: logged.append(str(message)))
    return logged


@torch.no_grad()
@pytest.mark.parametrize("method", ["flashvlm", "vflowopt"])
def test_no_deprecation_warning_from_the_hooks(case, method, transformers_messages):
    """A pruned generate() and a pruned forward without a cache (calibration's) print no deprecation: neither
    the warnings module's nor transformers' own message for the renamed cache keyword."""
    model, inputs = case
    with prunevlm.prune(model, method, budget=0.5, **({"layers": (1, 1)} if method == "vflowopt" else {})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.generate(**inputs, **GENERATE)
            model(**inputs, use_cache=False)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert [message for message in transformers_messages if "deprecated" in message] == []


def test_output_cache_reads_no_deprecated_name(transformers_messages):
    """An output without a cache (use_cache=False) is read without touching the old key name, which logs."""
    model = tiny.llava()
    with torch.no_grad():
        output = model(**tiny.llava_inputs([1]), use_cache=False)
    assert output_cache(output) is None
    assert transformers_messages == []


def test_positional_arguments_are_bound_to_their_names():
    """A hooked module called positionally is read the same as one called by keyword."""
    model = tiny.llava()
    inputs = tiny.llava_inputs([1])
    with torch.no_grad(), prunevlm.prune(model, "flashvlm", budget=3) as handle:
        model(**inputs)
        expected = handle.stats.prefill_after
        base = model.model
        base(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])  # input_ids, pixel_values, mask
        assert handle.stats.prefill_after == expected


def test_a_release_newer_than_the_newest_tested_warns_once(monkeypatch):
    """Allowed by pip (<6) but never run by CI: prune() runs and warns once per process, naming the newest
    tested release (docs/transformers.md section 5)."""
    monkeypatch.setattr(contract, "transformers_version", lambda: "5.99.0")
    with pytest.warns(UserWarning, match=f"5.99.0 is newer than {contract.NEWEST_TESTED}, the newest release"):
        prunevlm.prune(tiny.llava(), "flashvlm", budget=3).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunevlm.prune(tiny.llava(), "flashvlm", budget=3).remove()  # once per process


@pytest.mark.parametrize("version", [contract.NEWEST_TESTED, "5.23.0"])
def test_a_tested_release_does_not_warn(monkeypatch, version):
    monkeypatch.setattr(contract, "transformers_version", lambda: version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunevlm.prune(tiny.llava(), "flashvlm", budget=3).remove()


def test_a_release_outside_the_declared_range_warns(monkeypatch):
    monkeypatch.setattr(contract, "transformers_version", lambda: "5.22.0")
    with pytest.warns(UserWarning, match="5.22.0 is outside the range prunevlm declares"):
        prunevlm.prune(tiny.llava(), "flashvlm", budget=3).remove()


def test_the_newest_tested_release_is_the_one_locked_and_documented():
    """One number, three places: the warning's constant, the lock the set-up installs, the README."""
    root = Path(__file__).resolve().parents[1]
    lock = (root / "requirements.lock").read_text().split()
    assert f"transformers=={contract.NEWEST_TESTED}" in lock
    assert f"newest tested: {contract.NEWEST_TESTED}" in (root / "README.md").read_text()
    assert SpecifierSet(contract.supported_range()) == SpecifierSet(">=5.23,<6")
