"""Build a LoRA adapter for the tiny Qwen2.5-VL checkpoint, with peft, the way a fine-tuning run would save one.

The adapter's weights are random (peft's `init_lora_weights=False`) so that it really changes the base model's
answers: a request served by the adapter and one served by the base model can be told apart. vLLM serves it by
name beside the base model (`--enable-lora --lora-modules NAME=OUT_DIR`).

Run it with the vLLM environment's Python, after the tiny checkpoint exists:
    python deploy/models/build_tiny_lora.py BASE_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

RANK = 8
# The language model's attention projections: the modules vLLM's Qwen2.5-VL supports adapters on, and a Qwen-VL
# fine-tune's usual targets. The vision tower's own `qkv`/`proj` are left out, as vLLM serves text-side LoRA.
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def build(base_dir: Path, out_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(1)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    adapted = get_peft_model(base, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapted.save_pretrained(out_dir, safe_serialization=True)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    print(f"wrote {out_dir} (rank {RANK}, {trainable} adapter parameters, random weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    build(args.base_dir, args.out_dir)


if __name__ == "__main__":
    main()
