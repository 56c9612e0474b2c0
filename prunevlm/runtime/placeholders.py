"""Where a prompt's images sit: their placeholder columns, split into images and checked against them."""

from __future__ import annotations

import torch


def image_mask(adapter, input_ids, inputs_embeds) -> torch.Tensor | None:
    """[B, L] whether each column is an image placeholder, read from the ids or, without them, from the
    embeddings (the placeholder id's embedding row); None when the call carries neither."""
    if input_ids is not None:
        return input_ids == adapter.image_token_id
    if inputs_embeds is None:
        return None
    table = adapter.base.get_input_embeddings()
    image_row = table(torch.tensor(adapter.image_token_id, device=inputs_embeds.device))
    return (inputs_embeds == image_row).all(dim=-1)


def locate_images(image_mask: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """Split each row's placeholder columns into consecutive images of the given token counts.

    Returns one (row, columns) per image, in order. Raises if the placeholders and the images disagree.
    """
    per_row = image_mask.sum(dim=1).tolist()
    images: list[tuple[int, torch.Tensor]] = []
    remaining = list(counts)
    for row, columns in enumerate(image_mask):
        columns = torch.nonzero(columns).flatten()
        start = 0
        while start < columns.numel() and remaining:
            count = remaining.pop(0)
            if start + count > columns.numel():
                break
            images.append((row, columns[start : start + count]))
            start += count
        if start != columns.numel():
            remaining = [None]
            break
    if remaining or len(images) != len(counts):
        raise ValueError(
            f"the prompt's image placeholders do not match the images: rows hold {per_row} placeholder tokens "
            f"(total {sum(per_row)}) but the {len(counts)} image(s) give {counts} tokens (total {sum(counts)}). "
            f"Build the inputs with the model's processor (processor(images=..., text=...)), one image "
            f"placeholder per image, so that each placeholder expands to its image's tokens."
        )
    return images
