"""The rooms of the house (docs/architecture.md): what each may import and know."""

import ast
import re
from pathlib import Path

import pytest

from prunevlm.methods.base import Method

PACKAGE = Path(__file__).resolve().parent.parent / "prunevlm"
# Outside models/, two places know a family on purpose: the demo trains and runs the bundled LLaVA, and the
# benchmark builds LLaVA-shaped random models from configs.
MODEL_SPECIFIC = {PACKAGE / "models", PACKAGE / "demo", PACKAGE / "bench" / "models.py"}
# Module paths of the supported families' models, and config fields only some families have.
# (an adapter's own attributes, e.g. `adapter.language_model`, are what the other rooms use instead)
MODULE_TREE = re.compile(r"(?<!adapter)\.(language_model|vision_tower|visual|multi_modal_projector)\b|\bmodel\.model\b")
FAMILY_CONFIG = re.compile(r"\.(image_seq_length|vision_feature_layer|vision_feature_select_strategy|image_token_index|"
                           r"spatial_merge_size|vision_config|text_config)\b")


def sources(folder: Path):
    return sorted(folder.rglob("*.py"))


def outside_models():
    return [p for p in sources(PACKAGE) if not any(room == p or room in p.parents for room in MODEL_SPECIFIC)]


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against the package."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(parts[: len(parts) - node.level])
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def test_methods_import_neither_transformers_nor_models():
    for path in sources(PACKAGE / "methods") + sources(PACKAGE / "signals"):
        for name in imported_modules(path):
            assert not name.startswith(("transformers", "prunevlm.models")), f"{path.name} imports {name}"


def test_nothing_imports_the_command_line():
    """cli.py is the top of the house: the commands it starts import what they share from below it
    (defaults.py), never from it; only `python -m prunevlm` (__main__.py) runs it."""
    for path in sources(PACKAGE):
        if path.name != "__main__.py" and path != PACKAGE / "cli.py":
            assert "prunevlm.cli" not in imported_modules(path), f"{path.relative_to(PACKAGE)} imports prunevlm.cli"


def test_only_adapters_walk_a_model_or_read_family_config_fields():
    for path in outside_models():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            assert not MODULE_TREE.search(code), f"{path.relative_to(PACKAGE)}:{number} walks a model: {line.strip()}"
            assert not FAMILY_CONFIG.search(code), f"{path.relative_to(PACKAGE)}:{number} reads a family's config: {line.strip()}"


def test_the_runtime_reads_only_what_methods_declare():
    declared = {name for name in dir(Method) if not name.startswith("_")} | {"name"}
    for path in sources(PACKAGE / "runtime") + [PACKAGE / "api.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "method":
                assert node.attr in declared, f"{path.name} reads method.{node.attr}, which Method does not declare"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                assert "method" not in ast.unparse(node.args[0]), f"{path.name} probes a method: {ast.unparse(node)}"


def test_only_the_contract_module_names_a_hooked_forwards_cache():
    for path in sources(PACKAGE):
        if path.name == "contract.py":
            continue
        text = path.read_text()
        assert "past_key_values" not in text, f"{path.relative_to(PACKAGE)} names past_key_values"
        assert not re.search(r"""kwargs(\.get\(|\[)["']cache["']""", text), f"{path.relative_to(PACKAGE)} reads the cache keyword"


def test_a_method_added_by_the_recipe_runs_everywhere(monkeypatch):
    """docs/architecture.md: one method file and one registry line, nothing else."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    import prunevlm
    import tiny
    from prunevlm import methods
    from prunevlm.methods.base import Selection

    @dataclass
    class EveryOther(Method):
        name: ClassVar[str] = "every_other"
        description: ClassVar[str] = "baseline: k tokens at even spacing in raster order"
        signals: ClassVar[tuple[str, ...]] = ("image_tokens",)

        def select(self, k, image_tokens) -> Selection:
            batch, num_tokens = image_tokens.shape[:2]
            keep = (torch.arange(k) * num_tokens // k).to(image_tokens.device)
            return Selection(keep=keep.expand(batch, -1).clone())

    monkeypatch.setitem(methods.METHODS, EveryOther.name, EveryOther)  # the registry line
    assert "every_other" in [m["name"] for m in prunevlm.list_methods()]
    model, inputs = tiny.llava(), tiny.llava_inputs([1, 0, 2])
    with torch.no_grad(), prunevlm.prune(model, "every_other", budget=4) as handle:
        model.generate(**inputs, max_new_tokens=2, **tiny.GREEDY)
    assert handle.stats.tokens_after == [[4], [], [4, 4]]
    assert [k.tolist() for k in handle.stats.kept[0]] == [[0, 4, 8, 12]]


def test_a_family_added_by_the_recipe_is_chosen_by_class(monkeypatch):
    import torch
    from transformers import LlavaForConditionalGeneration

    import prunevlm
    import tiny
    from prunevlm import models
    from prunevlm.models.llava import LlavaAdapter

    class NewFamilyForConditionalGeneration(LlavaForConditionalGeneration):
        pass

    class NewFamilyAdapter(LlavaAdapter):  # a family whose models look like LLaVA's
        family = "newfamily"
        model_classes = ("NewFamilyForConditionalGeneration",)

    model = tiny.llava()
    model.__class__ = NewFamilyForConditionalGeneration
    with pytest.raises(NotImplementedError, match="does not support NewFamilyForConditionalGeneration"):
        prunevlm.prune(model, "flashvlm", 4)
    monkeypatch.setattr(models, "ADAPTERS", models.ADAPTERS + (NewFamilyAdapter,))  # the registry line
    with torch.no_grad(), prunevlm.prune(model, "flashvlm", budget=4) as handle:
        model(**tiny.llava_inputs([1]))
    assert handle.adapter.family == "newfamily" and handle.stats.tokens_after == [[4]]
