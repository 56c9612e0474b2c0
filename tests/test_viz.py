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
from prunevlm.viz import HATCH, PRUNED_SHADE, count_text, draw_tokens, legend, model_view


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


def cell_medians(drawn: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per token cell (row-major), the median of the red channel: the cell's shade, hatch lines aside."""
    rows, cols = grid
    height, width = drawn.shape[:2]
    return np.array([np.median(drawn[r * height // rows : (r + 1) * height // rows, c * width // cols : (c + 1) * width // cols, 0])
                     for r in range(rows) for c in range(cols)])


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
        shades = cell_medians(drawn, grid)
        bright = np.isclose(shades, 128, atol=1)
        assert bright.sum() == 3 and set(np.flatnonzero(bright)) == set(indices.tolist())
        assert np.allclose(shades[~bright], round(128 * (1 - PRUNED_SHADE)), atol=1)


def coloured(inputs: dict, rgb: tuple[float, float, float]) -> dict:
    """Qwen inputs whose every pixel is `rgb` (0..1) once un-normalised with Processor's mean and std."""
    patches = inputs["pixel_values"].shape[0]
    value = (torch.tensor(rgb) - 0.5) / 0.5
    return dict(inputs, pixel_values=value.view(1, 3, 1, 1, 1).expand(patches, 3, 2, 8, 8).reshape(patches, -1))


def find(sheet: Image.Image, part: Image.Image) -> bool:
    """Whether `part` appears pixel for pixel somewhere in `sheet`."""
    big, small = np.asarray(sheet.convert("RGB")), np.asarray(part.convert("RGB"))
    h, w = small.shape[:2]
    for y, x in zip(*np.nonzero((big == small[0, 0]).all(axis=2))):
        if y + h <= big.shape[0] and x + w <= big.shape[1] and np.array_equal(big[y : y + h, x : x + w], small):
            return True
    return False


@pytest.mark.parametrize("patches", [(4, 8), (8, 4)])
def test_pictures_keep_the_image_s_aspect_ratio(patches):
    """A Qwen image twice as wide as high (or high as wide) is drawn so, not squeezed into a square."""
    model = tiny.qwen2_vl()
    inputs = coloured(tiny.qwen_inputs([[patches]]), (1.0, 0.0, 0.0))
    with prunevlm.prune(model, "flashvlm", 1.0) as handle:  # every token kept: both pictures pure red
        model(**inputs)
        sheet = np.asarray(handle.draw(inputs, Processor))
    red = (sheet == (255, 0, 0)).all(axis=2)
    ys, xs = np.nonzero(red)
    top, left = ys.min(), xs.min()
    height = int(red[top:, left].argmin())  # the first picture's left edge, top to bottom
    width = int(red[top, left:].argmin())  # its top edge, left to right
    assert width > 0 and height > 0 and width / height == pytest.approx(patches[1] / patches[0], rel=0.02)


def test_pruned_cells_show_on_a_black_image():
    """Darkening alone leaves a black image unchanged: pruned cells are hatched, kept ones stay black."""
    grid, kept = (4, 4), torch.tensor([0, 5, 10, 15])
    black = Image.new("RGB", (200, 200))
    drawn = np.asarray(draw_tokens(black, grid, kept)).max(axis=2)
    for cell in range(16):
        r, c = divmod(cell, 4)
        block = drawn[r * 50 : (r + 1) * 50, c * 50 : (c + 1) * 50]
        if cell in kept:
            assert (block == 0).all()
        else:
            assert (block == HATCH[0]).mean() > 0.1


def test_the_sheet_has_a_legend_of_the_marks_it_uses():
    """The kept and pruned swatches are on every sheet; the recycled one only where a token was recycled."""
    model = tiny.llava(layers=4)
    inputs = tiny.llava_inputs([1])
    keys = {text.split(":")[0]: swatch for swatch, text in legend(recycling=True)}
    for method, options in [("flashvlm", {}), ("vflowopt", {"layers": (1, 2)})]:
        with prunevlm.prune(model, method, 0.5, **options) as handle:
            model(**inputs)
            sheet = handle.draw(inputs, Processor)
        recycling = any(r.numel() for row in handle.stats.recycled for r in row)
        assert recycling == (method == "vflowopt")
        assert find(sheet, keys["kept"]) and find(sheet, keys["pruned"])
        assert find(sheet, keys["orange box"]) == recycling


def test_the_count_says_what_the_budget_counts():
    """VFlowOpt keeps more tokens at the LLM input than its budget (11 of 16 at 0.5, say): the text says that
    its later stages keep fewer and that the budget counts their average over the layers."""
    model, inputs = tiny.llava(layers=4), tiny.llava_inputs([1])
    with prunevlm.prune(model, "vflowopt", 0.5, layers=(1, 2)) as handle:
        model(**inputs)
    (plan,), (kept,) = handle.stats.stages[0], handle.stats.kept[0]
    assert abs(plan.layer_average - 8) <= 0.5 and kept.numel() > 8
    text = count_text(handle.stats, 0, 0, kept.numel(), 16)
    assert text.startswith(f"{kept.numel()} of its 16 visual tokens enter the LLM")
    assert f"{plan.counts[1]} from layer 1, {plan.counts[2]} from layer 2" in text
    assert f"over the 4 layers that is {plan.layer_average:.1f} tokens, what the budget counts" in text
    with prunevlm.prune(model, "flashvlm", 0.5) as handle:
        model(**inputs)
    assert count_text(handle.stats, 0, 0, 8, 16) == "8 of its 16 visual tokens reach the LLM."


def test_draw_refuses_what_it_cannot_draw(tmp_path):
    model, inputs = tiny.llava(), tiny.llava_inputs([1])
    with prunevlm.prune(model, "flashvlm", 0.5) as handle:
        model(**inputs)
        with pytest.raises(ValueError, match="no file extension; give a file name ending in .png"):
            handle.draw(inputs, Processor, str(tmp_path / "kept"))
        for name in ("kept.txt", "kept.psd"):  # Pillow reads .psd but cannot write it
            with pytest.raises(ValueError, match=f"'{name[4:]}' is not an image format Pillow writes"):
                handle.draw(inputs, Processor, str(tmp_path / name))
        with pytest.raises(ValueError, match="needs the processor that made the inputs.*got NoneType"):
            handle.draw(inputs, None)
        with pytest.raises(ValueError, match="the inputs hold no images"):
            handle.draw({"input_ids": inputs["input_ids"]}, Processor)
    assert not list(tmp_path.iterdir())
