"""Tokenizer, processor and (untrained) LLaVA model of the demo VLM, built offline from configs.

``build_tokenizer`` trains a word-level tokenizer on dataset text; ``build_processor`` wraps it in a
``LlavaProcessor`` with a PIL image processor and the chat template
``"USER: <image>\\n{question} ASSISTANT:"`` (the answer follows, then ``</s>``);
``build_model`` makes a ``LlavaForConditionalGeneration`` with a CLIP vision tower (CLS token,
``vision_feature_layer=-2``, ``"default"`` strategy, as LLaVA-1.5) and a Llama text model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordLevelTrainer
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import dataset

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]
PATCH_SIZE = 16
IMAGE_TOKENS = (dataset.IMAGE_SIZE // PATCH_SIZE) ** 2  # 12 x 12 = 144 per image
MAX_NEW_TOKENS = 4
CAPTION_QUESTION = "describe the image ."
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Model sizes: ~6.2 M parameters, 12.5 MB in fp16. See docs/demo.md for why.
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6)
TEXT = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512)


def prompt(question: str) -> str:
    """The chat-templated prompt for one image and one question (what the template renders)."""
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


def corpus(n_images: int = 500, seed: int = 0) -> list[str]:
    """Dataset text (train split only) that the tokenizer is trained on."""
    lines = [f"USER: ASSISTANT: {CAPTION_QUESTION}"]
    for sample in dataset.generate("train", n_images, seed):
        lines.append(dataset.caption(sample))
        lines += [f"{q.text} {q.answer}" for q in sample.questions]
    # every answer, shape plural and position, even if a small corpus missed one
    lines += [" ".join(sorted(a)) for a in dataset.ANSWERS.values()]
    lines += [" ".join(dataset.PLURALS.values()), " ".join(sum(dataset.POSITIONS, ()))]
    return lines


def build_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased, punctuation split off) with BOS prepended."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(lines, WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left")


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = dataset.IMAGE_SIZE
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised demo model whose special ids match ``tokenizer``."""
    vocab = -(-len(tokenizer) // 8) * 8
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=dataset.IMAGE_SIZE, patch_size=PATCH_SIZE,
                                       **VISION),
        text_config=LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **TEXT, **ids),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **ids,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **ids)
    return model
