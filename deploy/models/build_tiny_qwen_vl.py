"""Build a tiny random-weight Qwen2.5-VL checkpoint that vLLM can serve offline.

Real weights cannot be downloaded in CI or on an air-gapped laptop, yet the chat path must be exercised against
a real vLLM. This writes a ~2.5 MB checkpoint with the real architecture (vision tower, M-RoPE, chat template,
processor) and random weights: its answers are gibberish, the serving path is the real one.

Run it with the vLLM environment's Python (it needs torch + transformers + tokenizers, never the gateway's):
    python deploy/models/build_tiny_qwen_vl.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's own chat template, trimmed of tool handling: vision parts become <|vision_start|><|X_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = string.ascii_letters + string.digits + string.punctuation
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 4,
        "Describe this image in one sentence. What is in the picture? " * 4,
        " ".join(words[i : i + 5] for i in range(len(words))),
        "You are a helpful assistant. Hello, how are you today? " * 4,
    ]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def build(out_dir: Path, scale: int = 1) -> None:
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(0)
    raw = _train_tokenizer(vocab_size=1024)
    ids = {tok: raw.token_to_id(tok) for tok in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    vocab_size = 1024  # trained vocab already holds the special tokens
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 128 * scale,
            "intermediate_size": 256 * scale,
            "num_hidden_layers": 2 * scale,
            "num_attention_heads": 2 * scale,  # head_dim stays 64: mrope_section sums to head_dim / 2
            "num_key_value_heads": 1,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2 * scale,
            "hidden_size": 64 * scale,
            "intermediate_size": 128 * scale,
            "num_heads": 2 * scale,
            "out_hidden_size": 128 * scale,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 256}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out_dir} ({params / 1e6:.2f} M parameters, random weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--scale", type=int, default=1, help="widen and deepen by this factor (benchmarks: prefill that costs)"
    )
    args = parser.parse_args()
    build(args.out_dir, args.scale)


if __name__ == "__main__":
    main()
