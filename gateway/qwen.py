"""What the gateway knows of the served model's vocabulary: Qwen2.5-VL's reserved tokens and placeholder ids (a
pool's defaults, gateway/config.py), and how to read them from a checkpoint's own tokenizer when the gateway can
see it (a pool's `tokenizer`), so a model with other or more control tokens is covered without listing them."""

from __future__ import annotations

import json
from pathlib import Path

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
MEDIA_PLACEHOLDERS = frozenset(
    {"<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"}
)

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # a real Qwen2.5-VL tokenizer.json is ~7 MB
MAX_ADDED_TOKENS = 1024  # the most reserved tokens a pool may list
MAX_TOKEN_CHARS = 64


class TokenizerUnreadable(ValueError):
    pass


def added_vocabulary(path: str) -> tuple[list[str], list[int]]:
    """The added tokens of a Hugging Face `tokenizer.json` (given, or inside the checkpoint directory given), and
    the ids of those that are media placeholders.

    The tokenizer matches an added token whole wherever it appears in text, so each one in a client's text would
    reach the model as that control token. The special ones count, and so do the others that hold no whitespace:
    Qwen2.5 marks `<tool_call>` and the fill-in-the-middle markers as not special, while an added token made of
    spaces or line breaks (some checkpoints add them) is a spelling, not a control token, and refusing it would
    refuse ordinary text. Read at configuration time, once."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_TOKENIZER_BYTES + 1)
        if len(raw) > MAX_TOKENIZER_BYTES:
            raise TokenizerUnreadable(f"{file} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB")
        added = json.loads(raw).get("added_tokens", [])
        entries = [(str(entry["content"]), bool(entry.get("special")), int(entry["id"])) for entry in added]
    except TokenizerUnreadable:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TokenizerUnreadable(f"cannot read the added tokens of {file}: {type(exc).__name__}") from None
    if len(entries) > MAX_ADDED_TOKENS:
        raise TokenizerUnreadable(f"{file} has {len(entries)} added tokens, more than {MAX_ADDED_TOKENS}")
    if not all(0 < len(content) <= MAX_TOKEN_CHARS for content, _, _ in entries):
        raise TokenizerUnreadable(f"{file} has an added token that is empty or longer than {MAX_TOKEN_CHARS} chars")
    tokens = [content for content, special, _ in entries if special or not any(c.isspace() for c in content)]
    return tokens, [token_id for content, _, token_id in entries if content in MEDIA_PLACEHOLDERS]
