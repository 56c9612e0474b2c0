"""Bad input gets an error that says what is wrong and what to do."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunevlm
import tiny
import prunevlm.methods
from prunevlm.config import load_config, save_config


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
def test_qwen_video_is_refused():
    model = tiny.qwen2_vl()
    inputs = tiny.qwen_inputs([[(4, 4)]])
    inputs["pixel_values_videos"] = inputs.pop("pixel_values")
    inputs["video_grid_thw"] = inputs.pop("image_grid_thw")
    with prunevlm.prune(model, "flashvlm", 2), pytest.raises(NotImplementedError, match="video"):
        model(**inputs)


@torch.no_grad()
def test_labels_are_refused_while_pruning():
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    with prunevlm.prune(model, "flashvlm", 4), pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])


CALIBRATED = {"r_v": 0.2, "r_1": 0.9, "t": 1.0, "m": 10.0, "alpha": 0.0}


@pytest.mark.parametrize("config,error,message", [
    ({"method": "vflowopt", "budget": 0.1, "options": {**CALIBRATED, "layers": 3}}, ValueError,
     r"option layers must be tuple\[int, int\] \| None, got 3 \(int\)"),
    ({"method": "vflowopt", "budget": 0.1, "options": {**CALIBRATED, "m": "seventeen"}}, ValueError,
     r"option m must be float > 0, got 'seventeen' \(str\)"),
    ({"method": "vflowopt", "budget": 0.1, "options": {k: v for k, v in CALIBRATED.items() if k != "r_v"}}, ValueError,
     r"vflowopt options \['r_v'\] are missing: they are what a calibration sets"),
    ({"format": "prunevlm-config/9", "method": "flashvlm", "budget": 8, "options": {}}, ValueError,
     r"has format 'prunevlm-config/9'; this prunevlm reads 'prunevlm-config/1'"),
    ({"method": "flashvlm", "options": {}}, ValueError, "lacks budget"),
    ({"method": "flashvlm", "budget": 8, "options": {"speed": 1}}, TypeError, r"flashvlm has no option\(s\) \['speed'\]"),
    ({"method": "flashvlm", "budget": 8, "options": {"eta": True}}, ValueError, r"option eta must be float in \[0, 1\], got True"),
])
def test_configs_are_checked_field_by_field(tmp_path, config, error, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(error, match=f"the pruning config '{re.escape(str(path))}': .*{message}"):
        load_config(str(path))


def test_a_saved_config_lists_every_option_and_loads_back(tmp_path):
    path = tmp_path / "new" / "folder" / "vflowopt.json"
    save_config(str(path), "vflowopt", 0.1, CALIBRATED)
    saved = json.loads(path.read_text())["options"]
    assert set(saved) == set(prunevlm.methods.METHODS["vflowopt"].options())
    assert load_config(str(path))["options"] == saved
