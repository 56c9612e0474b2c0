"""Tiny random VLMs built from configs, and prompts for them (no hub, no processor)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    SiglipVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

VOCAB = 300
PAD, BOS, EOS = 0, 1, 2
LLAVA_IMAGE = 299
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 297, 298, 295, 296
# Greedy decoding for tests. Random models may emit an image token id, which a later uncached step would
# read as a placeholder (the unpruned model fails the same way), so those ids are suppressed.
GREEDY = dict(do_sample=False, suppress_tokens=[LLAVA_IMAGE, QWEN_IMAGE, QWEN_VIDEO])


# the vision tower of the LLaVA-style tiny models: 32 px, patch 8 (16 patch tokens), 3 layers
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def _build(cls, config, attn: str):
    """The model of `config` in eval mode, on the `attn` implementation, padding with PAD when generating."""
    config._attn_implementation = attn
    model = cls(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def _llama(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def llava(attn: str = "sdpa", seed: int = 0, layers: int = 2) -> LlavaForConditionalGeneration:
    """CLIP tower (32 px, patch 8: 16 patch tokens + CLS, 3 layers) and a Llama of `layers` layers."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TOWER),
        text_config=_llama(layers),
        image_token_index=LLAVA_IMAGE, image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=PAD,
    )
    return _build(LlavaForConditionalGeneration, config, attn)


# AnyRes tiles of 32 px (4 x 4 tokens of patch 8); 128 x 128 makes a 16 x 16 plane, which OneVision's
# anyres_max_9 (at most 9 x 16 tokens) downscales
PINPOINTS = [[32, 64], [64, 32], [64, 64], [64, 96], [128, 128]]


def llava_next(attn: str = "sdpa", seed: int = 0, layers: int = 2) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT: CLIP tower with CLS (32 px crops), AnyRes tiles, unpadding and row newlines."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**TOWER), text_config=_llama(layers),
                             image_token_index=LLAVA_IMAGE, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", pad_token_id=PAD)
    return _build(LlavaNextForConditionalGeneration, config, attn)


def llava_onevision(attn: str = "sdpa", seed: int = 0, layers: int = 2) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision: SigLIP tower (no CLS, all tokens), AnyRes with anyres_max_9 downscaling."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**TOWER), text_config=_llama(layers),
                                  image_token_index=LLAVA_IMAGE, video_token_index=LLAVA_IMAGE - 1,
                                  image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    return _build(LlavaOnevisionForConditionalGeneration, config, attn)


def anyres_inputs(model, sizes_per_row: list[list[tuple[int, int]]], text: int = 6, seed: int = 0) -> dict:
    """Left-padded batch for LLaVA-NeXT/OneVision: images of the given (h, w), each expanded to the
    placeholders the model packs for it (asked of the adapter, which runs the model's own packing)."""
    from prunevlm.models import get_adapter

    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([size for row in sizes_per_row for size in row]).reshape(-1, 2)
    adapter = get_adapter(model)
    crops = adapter.crops(sizes)
    counts = adapter.image_token_counts({"pixel_values": torch.zeros(1), "image_sizes": sizes})
    rows, image = [], 0
    for row_sizes in sizes_per_row:
        row = [BOS] + text_ids(text, g)
        for _ in row_sizes:
            row += [LLAVA_IMAGE] * counts[image] + text_ids(text, g)
            image += 1
        rows.append(row)
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if image:
        inputs["pixel_values"] = torch.randn(image, max(crops), 3, 32, 32, generator=g)
        inputs["image_sizes"] = sizes
    return inputs


def _qwen_configs(cls, vision: dict, layers: int = 2):
    return cls(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, pad_token_id=PAD,
    )


def qwen3_vl(attn: str = "sdpa", seed: int = 0, layers: int = 4) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: a 3-block vision tower whose blocks 0 and 1 feed DeepStack features to LLM layers 0 and 1,
    interleaved M-RoPE, a Qwen3 LLM of `layers` layers."""
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                            "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                           num_position_embeddings=16),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END, pad_token_id=PAD,
    )
    return _build(Qwen3VLForConditionalGeneration, config, attn)


def qwen2_vl(attn: str = "sdpa", seed: int = 0, layers: int = 2) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = _qwen_configs(Qwen2VLConfig, dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2), layers)
    return _build(Qwen2VLForConditionalGeneration, config, attn)


def qwen2_5_vl(attn: str = "sdpa", seed: int = 0, layers: int = 2, depth: int = 3,
               fullatt_block_indexes: tuple[int, ...] = (1,)) -> Qwen2_5_VLForConditionalGeneration:
    """Three vision blocks, windows of 2x2 merged tokens, block 1 full attention, block 2 windowed (by default)."""
    torch.manual_seed(seed)
    config = _qwen_configs(Qwen2_5_VLConfig, dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=4,
                                                  out_hidden_size=64, patch_size=8, spatial_merge_size=2,
                                                  temporal_patch_size=2, window_size=32,
                                                  fullatt_block_indexes=list(fullatt_block_indexes)),
                           layers)
    return _build(Qwen2_5_VLForConditionalGeneration, config, attn)


def text_ids(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(3, 290, (n,), generator=generator).tolist()


def left_pad(rows: list[list[int]], value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[value] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def llava_inputs(images_per_row: list[int], text: int = 6, seed: int = 0) -> dict:
    """Left-padded batch; row i holds images_per_row[i] images, each between text runs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for count in images_per_row:
        row = [BOS] + text_ids(text, g)
        for _ in range(count):
            row += [LLAVA_IMAGE] * 16 + text_ids(text, g)
        rows.append(row)
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask}
    total = sum(images_per_row)
    if total:
        inputs["pixel_values"] = torch.randn(total, 3, 32, 32, generator=g)
    return inputs


def qwen_inputs(grids_per_row: list[list[tuple[int, int]]], text: int = 6, seed: int = 0) -> dict:
    """Left-padded batch for Qwen; each image is a (h, w) patch grid (even sizes), t = 1."""
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for row_grids in grids_per_row:
        row = [BOS] + text_ids(text, g)
        for h, w in row_grids:
            row += [QWEN_START] + [QWEN_IMAGE] * (h * w // 4) + [QWEN_END] + text_ids(text, g)
            grids.append([1, h, w])
        rows.append(row)
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == QWEN_IMAGE).int()}
    if grids:
        grid_thw = torch.tensor(grids)
        patches = int(grid_thw.prod(dim=-1).sum())
        inputs["pixel_values"] = torch.randn(patches, 3 * 2 * 8 * 8, generator=g)
        inputs["image_grid_thw"] = grid_thw
    return inputs


def row_inputs(inputs: dict, row: int, images_before: int, images_in_row: int, family: str) -> dict:
    """The inputs of one row of a batch, unpadded."""
    real = inputs["attention_mask"][row].bool()
    single = {"input_ids": inputs["input_ids"][row][real][None], "attention_mask": inputs["attention_mask"][row][real][None]}
    if "mm_token_type_ids" in inputs:
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][row][real][None]
    if not images_in_row:
        return single
    if family in ("llava", "anyres"):  # one pixel_values entry per image (AnyRes: its crops, and its size)
        single["pixel_values"] = inputs["pixel_values"][images_before : images_before + images_in_row]
        if family == "anyres":
            single["image_sizes"] = inputs["image_sizes"][images_before : images_before + images_in_row]
    else:
        grid = inputs["image_grid_thw"]
        sizes = grid.prod(dim=-1)
        start = int(sizes[:images_before].sum())
        stop = start + int(sizes[images_before : images_before + images_in_row].sum())
        single["pixel_values"] = inputs["pixel_values"][start:stop]
        single["image_grid_thw"] = grid[images_before : images_before + images_in_row]
    return single


def _word_tokenizer():
    """A word-level tokenizer of the tiny vocabulary: w0 ... w279, <image> at LLAVA_IMAGE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(280)]
    vocab = {word: i for i, word in enumerate(words)}
    vocab["<image>"] = LLAVA_IMAGE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    return tokenizer


CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                 "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}w9{% endif %}")


def anyres_processor(model):
    """The processor of a tiny LLaVA-NeXT or LLaVA-OneVision model (32 px crops, PINPOINTS, PIL image
    processor, the word-level tokenizer)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    size = {"height": 32, "width": 32}
    if model.config.model_type == "llava_next":
        return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(size=size, crop_size=size, image_grid_pinpoints=PINPOINTS),
                                  tokenizer=_word_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return OnevisionProcessor(model)


class OnevisionProcessor:
    """LLaVA-OneVision's processing for a tiny model, without `LlavaOnevisionProcessor`, which cannot be built
    here (its video processor needs torchvision): the PIL image processor, the word-level tokenizer, and each
    <image> expanded to the placeholders the model packs for the image (asked of the adapter, as in
    `anyres_inputs`)."""

    chat_template = CHAT_TEMPLATE
    image_token = "<image>"

    def __init__(self, model):
        from transformers import LlavaOnevisionImageProcessorPil

        self.image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
        self.tokenizer = _word_tokenizer()
        self.model = model

    def apply_chat_template(self, conversation, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text=(), return_tensors="pt", padding=True):
        from transformers import BatchFeature

        from prunevlm.models import get_adapter

        pixels = dict(self.image_processor(images, return_tensors=return_tensors)) if images else {}
        counts = iter(get_adapter(self.model).image_token_counts(pixels))
        texts = []
        for row in text:
            first, *rest = row.split(self.image_token)
            texts.append(first + "".join(" ".join([self.image_token] * next(counts)) + part for part in rest))
        return BatchFeature({**self.tokenizer(texts, return_tensors=return_tensors, padding=padding), **pixels})


def save_llava_folder(path, layers: int = 2) -> None:
    """A tiny LLaVA with a word-level tokenizer and a PIL processor, saved like a hub checkpoint."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    tokenizer = _word_tokenizer()
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=CHAT_TEMPLATE,
    )
    llava(layers=layers).save_pretrained(path)
    processor.save_pretrained(path)


def greedy_margin(logits) -> float:
    """The smallest lead of the top logit over the runner-up, over every step and row of generate's logits."""
    return min(float(top[:, 0].sub(top[:, 1]).min()) for top in (step.topk(2, dim=-1).values for step in logits))


def assert_batch_equals_rows(model, inputs: dict, singles: list[dict], **generate) -> None:
    """generate() on the batch gives each row the tokens and logits of that row run alone (`singles`, one
    inputs dict per row); a row that stops early at EOS is padded from there in the batch. The logits are
    compared within 1e-5 (the batch sums in other orders); the tokens exactly, which that tolerance decides
    since every step's top logit leads by more than 2e-5 (checked)."""
    options = dict(generate, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(**inputs, **options)
    assert greedy_margin(batch.logits) > 2e-5
    for row, single in enumerate(singles):
        alone = model.generate(**single, **options)
        generated = alone.sequences[0, single["input_ids"].shape[1]:]
        in_batch = batch.sequences[row, inputs["input_ids"].shape[1]:]
        assert torch.equal(in_batch[: generated.numel()], generated)
        assert (in_batch[generated.numel():] == PAD).all()
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-5, rtol=0)
