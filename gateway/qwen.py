"""What the gateway knows of Qwen2.5-VL's vocabulary: the defaults of a pool's reserved tokens and ids
(gateway/config.py)."""

from __future__ import annotations

# Qwen2.5-VL's special tokens: in a client's text they would be read as control tokens (roles, media
# placeholders); placeholder ids in a token prompt crash some vLLM versions' workers (CVE-2026-44222).
QWEN_RESERVED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    # Qwen2.5's tool-call and fill-in-the-middle markers: text holding them could pose as a tool call
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_PLACEHOLDER_IDS = (151652, 151653, 151654, 151655, 151656)  # vision start/end/pad, image pad, video pad
