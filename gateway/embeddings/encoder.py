"""The CLIP encoder: an `Encoder` protocol and its open_clip implementation.

torch and open_clip are imported only when an encoder is built, so the proxy role runs without them installed.
Text and images land in one space, L2-normalised. Text is truncated to CLIP's context (77 tokens, start and end
markers included) by open_clip's tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gateway.retrieval_settings import EmbeddingsSettings

log = logging.getLogger("gateway.encoder")
Vectors = npt.NDArray[np.float32]


class Encoder(Protocol):
    model_id: str
    dim: int
    context_length: int
    image_tokens: int  # usage counted per image: patches + the class token
    device: str

    def tokenize(self, texts: list[str]) -> Any: ...
    def tokens_from_ids(self, ids: list[int]) -> Any: ...
    def preprocess(self, image: Any) -> Any: ...
    def encode_text(self, tokens: list[Any]) -> Vectors: ...
    def encode_image(self, pixels: list[Any]) -> Vectors: ...


def _tiny_random_clip() -> Any:
    """A 64-d CLIP with random weights, identical in every process (seeded), built without any download."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    torch.random.set_rng_state(generator_state)
    return model


def _load_weights(model: Any, checkpoint: str) -> None:
    import torch

    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        # weights_only: a checkpoint file can carry pickled code; only tensors are accepted.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})


class OpenClipEncoder:
    def __init__(self, settings: EmbeddingsSettings) -> None:
        import open_clip
        import torch

        self._torch = torch
        want_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if want_cuda else "cpu"
        if settings.clip_model == "tiny-random":
            model = _tiny_random_clip()
        else:
            hub_tag = None if settings.checkpoint else settings.pretrained
            model = open_clip.create_model(settings.clip_model, pretrained=hub_tag)
        if settings.checkpoint:
            _load_weights(model, settings.checkpoint)
        precision = settings.precision
        if precision == "auto":
            precision = "fp16" if self.device == "cuda" else "fp32"
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = model.to(device=self.device, dtype=self._dtype).eval()
        visual = model.visual
        image_size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
        self._preprocess = open_clip.image_transform(image_size, is_train=False)
        self._tokenizer = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE, shipped with open_clip
        grid = getattr(visual, "grid_size", (image_size[0] // 32, image_size[1] // 32))
        self.image_tokens = int(grid[0] * grid[1]) + 1
        self.context_length = int(model.context_length)
        self.vocab_size = int(model.vocab_size)
        self.dim = int(self.encode_text(self.tokenize(["probe"])).shape[1])
        self.model_id = settings.model_name()
        log.info("CLIP encoder %s ready on %s (%s, %d-d)", self.model_id, self.device, precision, self.dim)

    def tokenize(self, texts: list[str]) -> list[Any]:
        return list(self._tokenizer(texts, context_length=self.context_length))

    def tokens_from_ids(self, ids: list[int]) -> Any:
        row = self._torch.zeros(self.context_length, dtype=self._torch.long)
        clipped = ids[: self.context_length]
        row[: len(clipped)] = self._torch.tensor(clipped, dtype=self._torch.long)
        return row

    def preprocess(self, image: Any) -> Any:
        return self._preprocess(image)

    def _normalised(self, features: Any) -> Vectors:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    def encode_text(self, tokens: list[Any]) -> Vectors:
        torch = self._torch
        with torch.inference_mode():
            batch = torch.stack(list(tokens)).to(self.device)
            return self._normalised(self.model.encode_text(batch))

    def encode_image(self, pixels: list[Any]) -> Vectors:
        torch = self._torch
        with torch.inference_mode():
            batch = torch.stack(list(pixels)).to(device=self.device, dtype=self._dtype)
            return self._normalised(self.model.encode_image(batch))
