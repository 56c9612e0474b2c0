"""`prunevlm.demo.train --init`: version 2's two stages from the shipped weights, on a few steps (the real run
is in docs/demo.md). Checks what each stage trains, that a rerun with the seed gives the same weights, and what
the log records."""

import json

import pytest
import torch

from prunevlm.demo import accuracy
from prunevlm.demo import train as training


@pytest.fixture
def quick(monkeypatch):
    """Evaluate on 2 images of each split instead of 50 and 200."""
    monkeypatch.setattr(training, "VAL_IMAGES", 2)
    monkeypatch.setattr(training, "TEST_IMAGES", 2)


def weights(folder) -> dict:
    return accuracy.load(folder)[0].state_dict()


def changed(before: dict, after: dict, part: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if part in k)


def test_caption_trains_only_the_projector_and_crowd_everything(tmp_path, quick):
    scale = 1 / training.RETRAIN["crowd"][0]  # one step of each stage
    log = training.train(tmp_path / "out", seed=0, scale=scale, init=accuracy.MODEL_DIR,
                         checkpoints=tmp_path / "ckpt")
    assert list(log["stages"]) == ["caption", "crowd"] and log["init"] == str(accuracy.MODEL_DIR)
    assert log["train_images"] == training.V1_TRAIN_IMAGES + training.RETRAIN["caption"][1] // 2 + training.CROWD_MIX["plain"]
    assert log["crowded_train_images"] == training.RETRAIN["caption"][1] // 2 + training.CROWD_MIX["crowded"]
    assert set(log["crowded_accuracy"]) == {"attribute", "exists", "relation", "overall", "n"}
    assert log["crowded_accuracy"]["n"] == 6 and log["test_accuracy"]["n"] == 12
    assert set(log["stages"]["crowd"]["probes"][-1]) == {"step", "plain", "crowded"}

    v1 = weights(accuracy.MODEL_DIR)
    caption = torch.load(tmp_path / "ckpt" / "caption.pt", weights_only=True)["model"]
    assert changed(v1, caption, "multi_modal_projector")
    assert not changed(v1, caption, "vision_tower") and not changed(v1, caption, "language_model")
    final = weights(tmp_path / "out")
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        assert changed(caption, final, part), part
    saved = json.loads((tmp_path / "out" / "demo_train.json").read_text())
    assert saved["stage_config"]["caption"]["trainable"] == ["multi_modal_projector"]


def test_a_rerun_with_the_seed_gives_the_same_weights(tmp_path, quick):
    scale = 1 / training.RETRAIN["crowd"][0]
    for name in ("a", "b"):
        training.train(tmp_path / name, seed=3, scale=scale, init=accuracy.MODEL_DIR)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
