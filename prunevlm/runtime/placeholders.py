"""Where a prompt's images and videos sit: their placeholder columns, split into images (or videos) and
checked against them."""

from __future__ import annotations

import torch

from ..errors import InvalidInput


def placeholder_mask(adapter, input_ids, inputs_embeds, token_id: int) -> torch.Tensor | None:
    """[B, L] whether each column is a placeholder of `token_id` (the image's or the video's), read from the
    ids or, without them, from the embeddings (the placeholder id's embedding row); None when the call carries
    neither."""
    if input_ids is not None:
        return input_ids == token_id
    if inputs_embeds is None:
        return None
    table = adapter.base.get_input_embeddings()
    row = table(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == row).all(dim=-1)


def locate_images(image_mask: torch.Tensor, counts: list[int], kind: str = "image") -> list[tuple[int, torch.Tensor]]:
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
        raise InvalidInput(
            f"the prompt's {kind} placeholders do not match the {kind}s: rows hold {per_row} placeholder tokens "
            f"(total {sum(per_row)}) but the {len(counts)} {kind}(s) give {counts} tokens (total {sum(counts)}). "
            f"Build the inputs with the model's processor (processor({kind}s=..., text=...)), one {kind} "
            f"placeholder per {kind}, so that each placeholder expands to its {kind}'s tokens."
        )
    return images
