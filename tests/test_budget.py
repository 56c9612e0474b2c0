"""One Budget type, built where a budget enters: NumPy numbers behave as Python ones everywhere after."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import prunevlm
import tiny
from prunevlm.bench.evaluation import configurations
from prunevlm.budget import Budget
from prunevlm import DEMO_CONFIGS
from prunevlm.cli import build_parser, main, parse_budget
from prunevlm.config import FORMAT, load_config, save_config
from prunevlm.methods import METHODS
from prunevlm.methods.vflowopt import VFlowOpt

ROOT = Path(__file__).parents[1]
# each NumPy budget and the Python one it must act like; with 25 tokens np.float32(0.1) read as
# 0.10000000149 would keep 3 tokens, 0.1 keeps 2 (round(2.5) = 2)
NUMPY = [(np.int64(8), 8), (np.int32(8), 8), (np.float64(0.25), 0.25), (np.float32(0.25), 0.25), (np.float32(0.1), 0.1)]


def signals(method: str, side: int = 5) -> dict:
    """Every signal `method` takes, for 2 images of side x side tokens."""
    g = torch.Generator().manual_seed(0)
    batch, tokens = 2, side * side
    available = {
        "image_tokens": torch.randn(batch, tokens, 16, generator=g),
        "features": torch.randn(batch, tokens, 20, generator=g),
        "saliency": torch.rand(batch, tokens, generator=g),
        "text_embeds": torch.randn(batch, 7, 16, generator=g),
        "attention": torch.softmax(torch.randn(batch, tokens, tokens, generator=g), dim=-1),
        "patches": torch.randn(batch, tokens, 3, 14, 14, generator=g),
        "grid": (side, side),
        "frames": (1, side, side),  # EVS's: a clip of one frame
    }
    cls = METHODS[method]
    return {name: available[name] for name in cls.signals + cls.optional_signals if name in available}


def test_count_or_fraction():
    count, fraction = Budget(8), Budget(0.25)
    assert count.is_count and count.value == 8 and not fraction.is_count and fraction.value == 0.25
    assert count.tokens_to_keep(576) == 8 and count.tokens_to_keep(5) == 5  # a small image stays whole
    assert fraction.tokens_to_keep(576) == 144 and fraction.tokens_to_keep(2) == 1  # at least one token
    assert count.fraction_of(32) == 0.25 and count.fraction_of(4) == 1.0 and fraction.fraction_of(32) == 0.25
    assert Budget(1) != Budget(1.0)  # one token is not the whole image
    assert Budget.of(count) is count and str(count) == "8" and str(fraction) == "0.25"


@pytest.mark.parametrize("numpy_budget,python_budget", NUMPY)
def test_numpy_numbers_make_the_python_budget(numpy_budget, python_budget):
    budget = Budget(numpy_budget)
    assert budget == Budget(python_budget)
    assert type(budget.value) is type(python_budget)


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if not cls.llm_signals])  # the others
@pytest.mark.parametrize("numpy_budget,python_budget", NUMPY)  # choose inside the LLM (test_inllm_baselines.py)
def test_select_takes_numpy_budgets_like_python_ones(method, numpy_budget, python_budget):
    expected = prunevlm.select(method, python_budget, **signals(method))
    selection = prunevlm.select(method, numpy_budget, **signals(method))
    assert expected.keep.shape == (2, Budget(python_budget).tokens_to_keep(25))
    for name in ("keep", "scores", "tokens", "importance"):
        a, b = getattr(selection, name), getattr(expected, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@torch.no_grad()
@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if "frames" not in cls.signals])  # images
def test_prune_takes_numpy_budgets_like_python_ones(method):
    model, inputs = tiny.llava(layers=4), tiny.llava_inputs([1, 2])

    def run(budget):
        with prunevlm.prune(model, method, budget) as handle:
            model(**inputs)
            return handle.stats

    for python_budget, kept in ((8, 8), (0.25, 4)):
        if METHODS[method].llm_signals and python_budget == 0.25:
            continue  # below what layer 0 of 4 already holds (16 per image): refused, test_inllm_baselines.py
        expected = run(python_budget)
        assert all(abs(n - kept) <= 1 for row in expected.layer_average for n in row)  # it prunes (16 per image)
        for numpy_budget, same in NUMPY:
            if same == python_budget:
                stats = run(numpy_budget)
                assert stats.tokens_after == expected.tokens_after and stats.stages == expected.stages
                assert all(torch.equal(a, b) for row, ref in zip(stats.kept, expected.kept) for a, b in zip(row, ref))


def test_vflowopt_plans_a_numpy_count_as_a_count():
    assert VFlowOpt().plan(Budget(np.int64(64)), 576, 28).layer_average == pytest.approx(64, abs=1)


@pytest.mark.parametrize("budget,stored", [(np.int64(8), 8), (np.float32(0.1), 0.1), (Budget(0.25), 0.25)])
def test_configs_store_a_plain_number_and_load_a_budget(tmp_path, budget, stored):
    path = tmp_path / "config.json"
    save_config(str(path), "flashvlm", budget, {})
    written = json.loads(path.read_text())["budget"]
    assert written == stored and type(written) is type(stored)
    assert load_config(str(path))["budget"] == Budget(stored)


def test_configs_carry_the_budget_scope(tmp_path):
    path = tmp_path / "config.json"
    save_config(str(path), "flashvlm", 64, {}, budget_scope="per_crop")
    assert json.loads(path.read_text())["budget_scope"] == "per_crop"
    assert load_config(str(path))["budget_scope"] == "per_crop"
    model = tiny.llava_next()
    with prunevlm.prune(model, "flashvlm", config=str(path)) as handle:
        assert handle.budget_scope == "per_crop" and handle.runtime.budget_scope == "per_crop"
    with pytest.raises(ValueError, match="calibrated with budget_scope='per_crop'; pass that"):
        prunevlm.prune(model, "flashvlm", config=str(path), budget_scope="per_image")
    # a config written before the option counts per image
    assert load_config({"format": FORMAT, "method": "flashvlm", "budget": 64, "options": {}})["budget_scope"] == "per_image"
    with pytest.raises(ValueError, match="pruning config: budget_scope must be 'per_image'.*got 'crops'"):
        load_config({"format": FORMAT, "method": "flashvlm", "budget": 64, "budget_scope": "crops", "options": {}})
    with pytest.raises(ValueError, match="budget_scope must be"):
        save_config(str(path), "flashvlm", 64, {}, budget_scope="image")


@pytest.mark.parametrize("path", [Path(p) for p in DEMO_CONFIGS.values()], ids=lambda p: p.name)
def test_calibrated_results_still_load(path):
    config = load_config(str(path))
    raw = json.loads(path.read_text())
    assert config["budget"] == Budget(raw["budget"]) and not config["budget"].is_count
    model = tiny.llava(layers=4)
    with prunevlm.prune(model, "vflowopt", np.float64(raw["budget"]), config=config) as handle:
        assert handle.budget is config["budget"]


def test_a_config_budget_is_checked_when_loaded():
    with pytest.raises(TypeError, match="got True of type bool"):
        load_config({"format": FORMAT, "method": "flashvlm", "budget": True, "options": {}})
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\], got 1.5"):
        prunevlm.prune(tiny.llava(), "flashvlm", config={"format": FORMAT, "method": "flashvlm", "budget": 1.5, "options": {}})


def test_a_count_does_not_match_a_config_for_the_whole_image():
    config = {"format": FORMAT, "method": "flashvlm", "budget": 1.0, "options": {}}
    with pytest.raises(ValueError, match="calibrated for budget 1.0"):
        prunevlm.prune(tiny.llava(), "flashvlm", 1, config=config)


@pytest.mark.parametrize("text,budget", [("64", Budget(64)), ("0.25", Budget(0.25)), ("1e-1", Budget(0.1)),
                                         ("1.0", Budget(1.0))])
def test_command_line_text_is_parsed_once(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text,message", [
    ("x", r"must be an int, read as tokens kept per image \(e.g. 64\), or a decimal number, read as the fraction"),
    ("inf", "got 'inf'"),
    ("64.0", r"must lie in \(0, 1\], got 64.0; use an int >= 1"),
    ("0", "budget=0 keeps no visual token"),
])
def test_command_line_budget_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_budget(text)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "llava-hf/m", "--prompt", "p", "--budget", "x"], "argument --budget: .*read as tokens kept per image"),
    (["calibrate", "--budget", "8"], "not a token count"),
    (["calibrate", "--budget", "1.0"], r"--budget is T in \(0, 1\).*got 1.0"),
    (["bench", "--budgets", "64,x"], "argument --budgets: budget must be an int.*got 'x'"),
    (["eval", "--budgets", "0.25,x"], "argument --budgets: budget must be an int.*got 'x'"),
])
def test_bad_budgets_on_each_command_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_eval_configurations_hold_plain_numbers():
    args = build_parser().parse_args(["eval", "--budgets", "16,0.5", "--methods", "flashvlm"])
    budgets = [config["budget"] for config in configurations(args)]
    assert budgets == [None, 16, 0.5, 0.1, 0.1, 0.25, 0.25]  # plain numbers for the JSON report (a Budget is not 16)
