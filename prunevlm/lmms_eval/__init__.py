"""prunevlm as an lmms-eval model (docs/lmms-eval.md): `lmms-eval --model prunevlm --model_args
pretrained=...,method=flashvlm,budget=64 --tasks ...`, and the demo test split as lmms-eval tasks
(`prunevlm export-lmms-tasks DIR`).

lmms-eval finds the model through the entry point `prunevlm = "prunevlm.lmms_eval:manifest"` of the group
`lmms_eval.models` (pyproject.toml). Only `model` imports lmms-eval; `harness` and `tasks` do not.
"""

from __future__ import annotations


def manifest():
    """The registration lmms-eval reads from the entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunevlm", simple_class_path="prunevlm.lmms_eval.model.PruneVLM")
