"""The parts of ``LlavaForConditionalGeneration``'s forward that the demo training calls one by
one: pixel values, the tower's patch features, the projected image tokens, and the LLM input
embeddings with those tokens in place of ``<image>``."""

from __future__ import annotations

import torch


def pixels(processor, samples) -> torch.Tensor:
    """[B, 3, H, W] pixel values of the samples' images, from the processor's image processor."""
    return processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]


def tower_features(model, pix) -> torch.Tensor:
    """[B, N, Dv] the tower's patch features the projector reads (layer -2, CLS dropped), as in
    ``LlavaModel.forward``; a frozen tower (or a caller under no_grad) runs without gradients."""
    tower = model.model.vision_tower
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):
        hidden = tower(pix, output_hidden_states=True).hidden_states
        return hidden[model.config.vision_feature_layer][:, 1:]


def projected_features(model, pix) -> torch.Tensor:
    """[B, N, D] the image tokens as the LLM receives them: ``tower_features`` through the projector."""
    return model.model.multi_modal_projector(tower_features(model, pix))


def image_embeds(model, ids, tokens) -> torch.Tensor:
    """LLM input embeddings with the ``projected_features`` in place of the ``<image>`` tokens."""
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, tokens.to(embeds.dtype))
