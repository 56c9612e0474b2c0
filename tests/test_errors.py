"""Bad input gets an error that says what is wrong and what to do."""

import ast
import builtins
import copy
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunevlm
import tiny
import prunevlm.methods
from prunevlm.calibrate.storage import HEARTBEAT_INTERVAL, heartbeat_settings
from prunevlm.config import FORMAT, load_config, save_config
from prunevlm.demo import dataset
from prunevlm.models import adapter_class
from prunevlm.runtime.contract import cache_keyword, output_cache
from prunevlm.signals.entropy import grey_levels
from prunevlm.viz import check_picture_path


def signals(tokens=16):
    return {"image_tokens": torch.randn(1, tokens, 8), "saliency": torch.rand(1, tokens)}


ALLOWED = re.escape("an int >= 1 (visual tokens kept per image) or a float in (0, 1] (fraction of each image's tokens)")


def refused(budget, error, message):
    """The budget is refused alike by select(), prune() and a config, before anything else runs."""
    for call in (lambda: prunevlm.select("flashvlm", budget, **signals()),
                 lambda: prunevlm.prune(tiny.llava(), "flashvlm", budget),
                 lambda: save_config(os.devnull, "flashvlm", budget, {})):
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("budget", [0, -3, np.int64(0)])
def test_budget_of_zero_or_below(budget):
    refused(budget, ValueError, f"budget={re.escape(repr(budget))} keeps no visual token; use {ALLOWED}")


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2, math.nan, math.inf, -math.inf, np.float32(1.5), np.float64(math.nan)])
def test_fraction_outside_unit_interval(budget):
    refused(budget, ValueError, rf"must lie in \(0, 1\], got {re.escape(repr(budget))}; use an int >= 1 for a number of tokens")


@pytest.mark.parametrize("budget", [True, np.bool_(False), "64", [8], torch.tensor(8), 1 + 0j])
def test_budget_of_the_wrong_type(budget):
    message = f"budget must be {ALLOWED}, got {re.escape(repr(budget))} of type {type(budget).__name__}"
    refused(budget, TypeError, message)


def test_no_budget():
    with pytest.raises(TypeError, match=f"budget must be {ALLOWED}, got None of type NoneType"):
        prunevlm.select("flashvlm", None, **signals())
    with pytest.raises(TypeError, match=r"prune\(\) needs a budget: tokens per image \(int\) or a fraction"):
        prunevlm.prune(tiny.llava(), "flashvlm")


def test_int_budget_above_the_image_keeps_it_whole():
    assert torch.equal(prunevlm.select("flashvlm", 1000, **signals()).keep, torch.arange(16)[None])


def test_nan_features():
    bad = signals()
    bad["image_tokens"][0, 3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        prunevlm.select("flashvlm", 4, **bad)


@torch.no_grad()
def test_nan_features_from_the_model():
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    inputs["pixel_values"][0, 0, 0, 0] = math.nan
    with prunevlm.prune(model, "flashvlm", 4), pytest.raises(ValueError, match="NaN"):
        model(**inputs)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'fastest'; available: flashvlm"):
        prunevlm.select("fastest", 4, **signals())
    with pytest.raises(ValueError, match="available"):
        prunevlm.prune(tiny.llava(), "fastest", 4)


def test_unknown_option_and_missing_signal():
    with pytest.raises(TypeError, match="no option"):
        prunevlm.select("flashvlm", 4, temperature=3, **signals())
    with pytest.raises(TypeError, match="needs signal"):
        prunevlm.select("flashvlm", 4, image_tokens=torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="option eta must be in"):
        prunevlm.select("flashvlm", 4, eta=2.0, **signals())


def test_unsupported_model_is_refused():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(NotImplementedError, match="supported model classes: LlavaForConditionalGeneration"):
        prunevlm.prune(llama, "flashvlm", 4)


def test_unsupported_llava_configuration_is_refused():
    model = tiny.llava()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy='default'"):
        prunevlm.prune(model, "flashvlm", 4)


@torch.no_grad()
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_placeholders_that_do_not_match_the_images(call):
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    ids = inputs["input_ids"]
    first = int((ids[0] == tiny.LLAVA_IMAGE).nonzero()[0])
    ids[0, first] = 5  # 15 placeholders for a 16-token image
    with prunevlm.prune(model, "flashvlm", 4), pytest.raises(ValueError, match="placeholders do not match the images"):
        if call == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=2)


@torch.no_grad()
def test_qwen_placeholders_for_two_images_given_one():
    model = tiny.qwen2_vl()
    inputs = tiny.qwen_inputs([[(4, 4), (4, 4)]])
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    inputs["pixel_values"] = inputs["pixel_values"][:16]
    with prunevlm.prune(model, "flashvlm", 2), pytest.raises(ValueError, match="one image placeholder per image"):
        model(**inputs)


def test_attaching_twice_is_refused_until_removed():
    model = tiny.llava()
    handle = prunevlm.prune(model, "flashvlm", 4)
    with pytest.raises(RuntimeError, match="already attached"):
        prunevlm.prune(model, "vispruner", 4)
    handle.remove()
    prunevlm.prune(model, "vispruner", 4).remove()


def test_compact_positions_refused_for_mrope():
    with pytest.raises(ValueError, match="M-RoPE"):
        prunevlm.prune(tiny.qwen2_vl(), "flashvlm", 4, positions="compact")


@torch.no_grad()
def test_labels_are_refused_while_pruning():
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    with prunevlm.prune(model, "flashvlm", 4), pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])


CALIBRATED = {"r_v": 0.2, "r_1": 0.9, "t": 1.0, "m": 10.0, "alpha": 0.0}
V = {"format": FORMAT, "method": "vflowopt", "budget": 0.1}
F = {"format": FORMAT, "method": "flashvlm", "budget": 8}


@pytest.mark.parametrize("config,error,message", [
    ({**V, "options": {**CALIBRATED, "layers": 3}}, ValueError,
     r"option layers must be tuple\[int, int\] \| None, got 3 \(int\)"),
    ({**V, "options": {**CALIBRATED, "m": "seventeen"}}, ValueError,
     r"option m must be float > 0, got 'seventeen' \(str\)"),
    ({**V, "options": {k: v for k, v in CALIBRATED.items() if k != "r_v"}}, ValueError,
     r"vflowopt options \['r_v'\] are missing: they are what a calibration sets"),
    ({**F, "format": "prunevlm-config/9", "options": {}}, ValueError,
     r"has format 'prunevlm-config/9'; this prunevlm reads 'prunevlm-config/1'"),
    ({"format": FORMAT, "method": "flashvlm", "options": {}}, ValueError, "lacks budget"),
    ({**F, "options": {"speed": 1}}, TypeError, r"flashvlm has no option\(s\) \['speed'\]"),
    ({**F, "options": {"eta": True}}, ValueError, r"option eta must be float in \[0, 1\], got True"),
    # silently accepted before (#26 item 10): no format, an unknown key, infinite or overflowing numbers
    ({"method": "flashvlm", "budget": 8, "options": {}}, ValueError, 'lacks format: .* starts with "format": "prunevlm-config/1"'),
    ({**F, "budjet": 4, "options": {}}, ValueError, r"has unknown key\(s\) \['budjet'\]: a config holds format, method"),
    ({**V, "options": {**CALIBRATED, "m": math.inf}}, ValueError, "option m must be float > 0, got inf .* numbers must be finite"),
    ({**V, "options": {**CALIBRATED, "m": 10**400}}, ValueError, "option m must be float > 0, got 1000.* numbers must be finite"),
    ({"format": FORMAT, "method": "random", "budget": 8, "options": {"seed": 2**70}}, ValueError,
     "option seed must be int, got 1180591620717411303424 .* ints within 64 bits"),
])
def test_configs_are_checked_field_by_field(tmp_path, config, error, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(error, match=f"the pruning config '{re.escape(str(path))}': .*{message}"):
        load_config(str(path))


@pytest.mark.parametrize("text,message", [
    ("[" * 100_000 + "]" * 100_000, "its JSON is nested too deeply"),
    ('{"format": "prunevlm-config/1", "method": "random", "budget": 8, "options": {"seed": 1' + "0" * 5000 + "}}",
     "Exceeds the limit"),
    ("{not json", "Expecting property name"),
])
def test_unreadable_configs_are_refused_with_their_path(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(prunevlm.InvalidConfig, match=f"cannot read the pruning config '{re.escape(str(path))}': {message}"):
        load_config(str(path))


def test_save_config_writes_only_known_provenance(tmp_path):
    save_config(str(tmp_path / "ok.json"), "flashvlm", 8, {}, seed=3, model="m")
    assert load_config(str(tmp_path / "ok.json"))["seed"] == 3
    with pytest.raises(prunevlm.InvalidConfig, match=r"\['sede'\] are not provenance fields a config may carry"):
        save_config(str(tmp_path / "bad.json"), "flashvlm", 8, {}, sede=3)


@pytest.mark.parametrize("options,message", [
    ({"m": math.inf}, "option m must be float > 0, got inf"),
    ({"t": math.nan}, "option t must be float >= 0, got nan"),
    ({"layers": (1, 2**64)}, r"option layers must be tuple\[int, int\] \| None"),
])
def test_option_values_must_be_finite_and_fit_64_bits(options, message):
    with pytest.raises(ValueError, match=message):
        prunevlm.prune(tiny.llava(layers=4), "vflowopt", 0.5, **options)
    with pytest.raises(ValueError, match="option seed must be int, got 1180591620717411303424 .*ints within 64 bits"):
        prunevlm.prune(tiny.llava(), "random", 0.5, seed=2**70)


def test_prune_takes_the_method_from_its_config(tmp_path):
    path = tmp_path / "vflowopt.json"
    save_config(str(path), "vflowopt", 0.25, CALIBRATED)
    with prunevlm.prune(tiny.llava(layers=4), config=str(path)) as handle:
        assert handle.method.name == "vflowopt" and handle.method.r_v == 0.2
    with prunevlm.prune(tiny.llava(layers=4), budget=8) as handle:
        assert handle.method.name == "flashvlm"


@pytest.mark.parametrize("method,options,message", [
    ("vflowopt", {"layers": (1, 100)}, r"vflowopt: layers \(1, 100\) must lie below the LLM depth 4"),
    ("pdrop", {}, "pdrop: 3 stages need an LLM of more than 3 layers, got 2"),
])
def test_stage_layers_the_llm_lacks_are_refused_at_prune(method, options, message):
    model = tiny.llava(layers=4 if options else 2)
    with pytest.raises(prunevlm.Refused, match=message):
        prunevlm.prune(model, method, 0.5, **options)
    assert prunevlm.prune(model, "flashvlm", 4).attached  # nothing was left attached


ERRORS = {"InvalidSetting": ValueError, "InvalidBudget": (ValueError, TypeError), "InvalidOption": (ValueError, TypeError),
          "InvalidConfig": (ValueError, TypeError), "InvalidInput": ValueError, "InvalidSignals": (ValueError, TypeError),
          "Unsupported": NotImplementedError,
          "LoadError": RuntimeError, "HandleConflict": (RuntimeError, TypeError), "Refused": ValueError,
          "SignalsUnavailable": (ValueError, NotImplementedError), "ContractError": RuntimeError}


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_a_prune_error_and_the_builtin_it_replaces(name):
    error = getattr(prunevlm, name)
    assert issubclass(error, prunevlm.PruneError) and issubclass(error, ERRORS[name])
    assert name in prunevlm.__all__ and f"`{name}`" in (Path(__file__).parents[1] / "docs" / "errors.md").read_text()


def test_bad_signals_are_invalid_signals_and_still_type_errors():
    """A missing signal is what Python would call a missing argument (TypeError); a layout that does not hold
    the tokens what it would call a bad value (ValueError): both one kind."""
    given = signals()
    given.pop("saliency")
    with pytest.raises(prunevlm.InvalidSignals, match="needs signal"):
        prunevlm.select("flashvlm", 4, **given)
    with pytest.raises(TypeError):
        prunevlm.select("flashvlm", 4, **given)
    with pytest.raises(prunevlm.InvalidSignals, match="holds"):
        prunevlm.select("uniform", 4, image_tokens=torch.randn(1, 16, 8), grid=(3, 3))


def test_caught_as_prune_errors_and_as_before():
    with pytest.raises(prunevlm.InvalidBudget) as raised:
        prunevlm.select("flashvlm", 0, **signals())
    assert isinstance(raised.value, ValueError)
    with pytest.raises(prunevlm.InvalidBudget) as raised:
        prunevlm.select("flashvlm", "64", **signals())
    assert isinstance(raised.value, TypeError)
    with pytest.raises(prunevlm.PruneError, match="lacks format"):
        prunevlm.prune(tiny.llava(), config={"method": "flashvlm", "budget": 8, "options": {}})


@pytest.mark.parametrize("line,message", [
    ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),
    ('{"image": null, "prompt": "w", "n": 1' + "0" * 5000 + "}", "Exceeds the limit"),
    ('{"image": 7, "prompt": "w"}', "image must be a path, a list of paths or null, got 7"),
    ('{"image": ["a.png", 7], "prompt": "w"}', r"image must be a path, a list of paths or null, got \['a.png', 7\]"),
])
def test_bad_jsonl_rows_are_named_by_line(tmp_path, line, message):
    from prunevlm.loading import jsonl_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"image": null, "prompt": "w"}\n' + line + "\n")
    with pytest.raises(prunevlm.InvalidInput, match=f"{re.escape(str(path))}:2: .*{message}"):
        jsonl_rows(str(path))


def test_a_saved_config_lists_every_option_and_loads_back(tmp_path):
    path = tmp_path / "new" / "folder" / "vflowopt.json"
    save_config(str(path), "vflowopt", 0.1, CALIBRATED)
    saved = json.loads(path.read_text())["options"]
    assert set(saved) == set(prunevlm.methods.METHODS["vflowopt"].options())
    assert load_config(str(path))["options"] == saved


# -- every deliberate raise is a prunevlm kind (#26 item 11) --------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1]
# The files (or folders) whose deliberate errors must be prunevlm kinds, never a bare built-in; extend it as
# the rest of the package is swept, up to "prunevlm" itself.
SWEPT = ["prunevlm"]
# Built-in exceptions raised on purpose that are no refusal of the caller's: (file, function) -> why.
BUILTIN_ALLOWED = {
    ("prunevlm/models/base.py", "Adapter.image_token_counts"): "abstract: each family's adapter defines it",
    ("prunevlm/models/base.py", "Adapter.image_grids"): "abstract: each family's adapter defines it",
    ("prunevlm/models/base.py", "Adapter.pixel_views"): "abstract: each family's adapter defines it",
    ("prunevlm/models/base.py", "Adapter.install"): "abstract: each family's adapter defines it",
    ("prunevlm/demo/dataset.py", "_shape"): "a bug, not a refusal: the shapes drawn come from SHAPES only",
    ("prunevlm/methods/base.py", "Method.select"): "abstract: each method defines it",
    ("prunevlm/methods/base.py", "Method.select_frames"): "abstract: the methods that compare frames define it",
    ("prunevlm/methods/base.py", "Method.choose"): "abstract: each in-LLM method defines it",
    ("prunevlm/methods/base.py", "_as_type"): "a bug in a method's option annotation, not a refusal of the caller's",
    ("prunevlm/__init__.py", "__getattr__"): "Python's module attribute protocol asks for AttributeError",
}
BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, Exception)}


def swept_files() -> list[str]:
    files = []
    for entry in SWEPT:
        path = PACKAGE / entry
        files += [str(p.relative_to(PACKAGE)) for p in sorted(path.rglob("*.py"))] if path.is_dir() else [entry]
    return files


def builtin_errors(tree: ast.AST, scope: str = "") -> set[str]:
    """The functions (dotted within their classes) that raise or build a built-in exception: `raise
    ValueError(...)`, `raise NotImplementedError`, or `ValueError(...)` built to be raised elsewhere."""
    found = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found |= builtin_errors(node, f"{scope}.{node.name}".lstrip("."))
            continue
        made = node.func if isinstance(node, ast.Call) else node.exc if isinstance(node, ast.Raise) else None
        if isinstance(made, ast.Name) and made.id in BUILTIN_ERRORS:
            found.add(scope or "<module>")
        found |= builtin_errors(node, scope)
    return found


@pytest.mark.parametrize("path", swept_files())
def test_deliberate_errors_are_prunevlm_kinds(path):
    """Each error raised on purpose is a prunevlm.PruneError kind (docs/errors.md), so `except
    prunevlm.PruneError` catches it; the allowed exceptions are listed above, each still there."""
    found = builtin_errors(ast.parse((PACKAGE / path).read_text()))
    allowed = {function for file, function in BUILTIN_ALLOWED if file == path}
    assert not found - allowed, f"{path}: {sorted(found - allowed)} raise a built-in exception; raise the " \
                                f"prunevlm kind that says what is wrong (prunevlm/errors.py, docs/errors.md)"
    assert not allowed - found, f"{path}: BUILTIN_ALLOWED lists {sorted(allowed - found)}, which raise none now"


def test_the_sweep_finds_a_bare_builtin():
    source = """
class A:
    def f(self):
        raise ValueError("x")
    def g(self):
        raise NotImplementedError
def h():
    return RuntimeError("y")  # built here, raised by the caller
def i(error):
    if isinstance(error, ValueError):
        raise
    raise prunevlm.InvalidInput("z") from error
"""
    assert builtin_errors(ast.parse(source)) == {"A.f", "A.g", "h"}


def copied_cache_step():
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    with prunevlm.prune(model, "flashvlm", 4), torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = out.logits[:, -1:].argmax(dim=-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        model(input_ids=step, attention_mask=mask, **{cache_keyword(model): copy.deepcopy(output_cache(out))})


def second_handle():
    model = tiny.llava()
    prunevlm.prune(model, "flashvlm", 4)
    prunevlm.prune(model.model, "flashvlm", 4)


def deep_copy():
    model = tiny.llava()
    prunevlm.prune(model, "flashvlm", 4)
    copy.deepcopy(model)


def with_handle(model, inputs, **options):
    with prunevlm.prune(model, "flashvlm", 4), torch.no_grad():
        model(**inputs, **options)


def mismatched_placeholders():
    inputs = tiny.llava_inputs([1])
    inputs["input_ids"][0, int((inputs["input_ids"][0] == tiny.LLAVA_IMAGE).nonzero()[0])] = 5
    with_handle(tiny.llava(), inputs)


def config_for_another_method(tmp_path, monkeypatch):
    save_config(str(tmp_path / "v.json"), "vflowopt", 0.25, CALIBRATED)
    prunevlm.prune(tiny.llava(layers=4), "flashvlm", config=str(tmp_path / "v.json"))


def heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_INTERVAL, "soon")
    heartbeat_settings()


@pytest.mark.parametrize("call,kind,builtin,message", [
    # the user's mistakes that said "Install a supported release" (ContractError) or were bare built-ins
    (lambda *_: copied_cache_step(), "HandleConflict", RuntimeError, "a KV cache that no prefill under this pruning "
     r"handle produced: a copy of a cache .* Continue the cache the pruned prefill returned"),
    (lambda *_: second_handle(), "HandleConflict", RuntimeError, "already attached"),
    (lambda *_: deep_copy(), "HandleConflict", TypeError, "cannot be deep-copied"),
    (lambda *_: mismatched_placeholders(), "InvalidInput", ValueError, "placeholders do not match"),
    (lambda *_: with_handle(tiny.llava(), tiny.llava_inputs([1]), labels=torch.zeros(1, 1, dtype=torch.long)),
     "InvalidInput", ValueError, "labels"),
    (lambda *_: prunevlm.prune(tiny.qwen2_vl(), "flashvlm", 4, positions="compact"), "Refused", ValueError, "M-RoPE"),
    (lambda *_: prunevlm.prune(tiny.llava(), "flashvlm", 4, positions="middle"), "InvalidSetting", ValueError,
     "positions must be"),
    (lambda *_: prunevlm.prune(tiny.llava(), "flashvlm"), "InvalidBudget", TypeError, r"prune\(\) needs a budget"),
    (config_for_another_method, "InvalidConfig", ValueError,
     "the config is for 'vflowopt', not 'flashvlm': give method 'vflowopt' or none"),
    (lambda *_: adapter_class("GPT2LMHeadModel"), "Unsupported",
     NotImplementedError, "does not support GPT2LMHeadModel"),
    (lambda *_: check_picture_path("kept"), "InvalidSetting", ValueError,
     "no file extension"),
    (lambda *_: grey_levels(torch.zeros(1, 3, 2, 2), mode="x"),
     "InvalidOption", ValueError, "entropy mode must be"),
    (lambda *_: dataset.render("train2", 0), "InvalidSetting", ValueError,
     "unknown split"),
    (heartbeat, "InvalidSetting", ValueError, "give a whole number of seconds"),
], ids=["copied cache", "second handle", "deep copy", "placeholders", "labels", "compact M-RoPE", "positions",
        "no budget", "config of another method", "unsupported model", "picture path", "entropy mode", "demo split",
        "heartbeat"])
def test_refusals_are_their_kind_and_the_builtin_they_were(call, kind, builtin, message, tmp_path, monkeypatch):
    with pytest.raises(getattr(prunevlm, kind), match=message) as raised:
        call(tmp_path, monkeypatch)
    assert isinstance(raised.value, builtin) and "Install a supported release" not in str(raised.value)

