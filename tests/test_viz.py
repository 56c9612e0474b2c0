"""The kept-token picture: the adapters give back the pixels as the tower saw them, and handle.draw darkens
exactly the pruned tokens' cells."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

import prunevlm
import tiny
from prunevlm.models import get_adapter
from prunevlm.viz import PRUNED_SHADE, draw_tokens, model_view


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


def test_qwen_pixel_views_undo_the_processor_s_patch_layout():
    processor = Qwen2VLImageProcessor(patch_size=8, temporal_patch_size=2, merge_size=2, do_resize=False)
    image = gradient(48, 32)
    inputs = processor(images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    (view,) = get_adapter(tiny.qwen2_vl()).pixel_views(inputs)
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert view.shape == (3, 32, 48)
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=1e-5)


class Processor:
    """What kept_tokens_picture reads from a processor: its image normalisation."""

    class image_processor:
        image_mean = (0.5, 0.5, 0.5)
        image_std = (0.5, 0.5, 0.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_draw_darkens_exactly_the_pruned_cells(family, tmp_path):
    model = tiny.llava() if family == "llava" else tiny.qwen2_vl()
    inputs = tiny.llava_inputs([1, 1]) if family == "llava" else tiny.qwen_inputs([[(4, 6)], [(4, 4)]])
    inputs["pixel_values"] = torch.zeros_like(inputs["pixel_values"])  # mid-grey: 128 after un-normalising
    with prunevlm.prune(model, "flashvlm", 3) as handle:
        model(**inputs)
        picture = handle.draw(inputs, Processor, str(tmp_path / "sub" / "kept.png"))
    assert (tmp_path / "sub" / "kept.png").is_file() and picture.size[0] > 0
    adapter = get_adapter(model)
    kept = [k for row in handle.stats.kept for k in row]
    for view, grid, indices in zip(adapter.pixel_views(inputs), adapter.image_grids(inputs), kept):
        drawn = np.asarray(draw_tokens(model_view(view, (0.5,) * 3, (0.5,) * 3), grid, indices)).astype(float)
        rows, cols = grid
        cell_h, cell_w = drawn.shape[0] // rows, drawn.shape[1] // cols
        centres = drawn[cell_h // 2 :: cell_h, cell_w // 2 :: cell_w, 0][:rows, :cols].flatten()
        bright = np.isclose(centres, 128, atol=1)
        assert bright.sum() == 3 and set(np.flatnonzero(bright)) == set(indices.tolist())
        assert np.allclose(centres[~bright], round(128 * (1 - PRUNED_SHADE)), atol=1)
