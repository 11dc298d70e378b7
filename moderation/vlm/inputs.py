"""vlm_preprocess: Qwen3-VL patches at a fixed resolution and the prompt body's token ids for one post."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..core.contracts import DecoderOptions
from ..core.pinned import pin_of
from ..core.post import Post
from .prompts import PromptBuilder

MAX_CAPTION_TOKENS = 256  # caption tokens the VLM reads; longer captions are cut, and RESULT says so


class QwenPixels:
    """Qwen3-VL patches at one fixed resolution (448x448 -> 784 patches -> 196 visual tokens), so the
    ONNX vision encoder has static shapes and batches."""

    def __init__(self, checkpoint_dir: str, side: int = 448):
        from transformers import Qwen2VLImageProcessorPil

        base = Qwen2VLImageProcessorPil.from_pretrained(checkpoint_dir)
        self.processor = Qwen2VLImageProcessorPil(
            patch_size=base.patch_size, temporal_patch_size=base.temporal_patch_size, merge_size=base.merge_size,
            image_mean=base.image_mean, image_std=base.image_std,
            min_pixels=side * side, max_pixels=side * side,
        )
        self.side = side
        self.merge_size = base.merge_size

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        image = image.resize((self.side, self.side), Image.Resampling.BICUBIC)
        out = self.processor(images=[image], return_tensors="np")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

    @property
    def num_visual_tokens(self) -> int:
        patches = (self.side // self.processor.patch_size) ** 2
        return patches // (self.merge_size ** 2)


# A post of several images reaches the VLM as one picture of its first SHEET_IMAGES images, in reading order (the
# vision encoder's grid is fixed, so the post costs one image's 196 visual tokens whatever its image count).
SHEET_IMAGES = 4
SHEET_GUTTER = 8


def contact_sheet(images: list[Image.Image], side: int = 448) -> Image.Image:
    """Up to SHEET_IMAGES images on one white side x side picture: side by side for two, a 2 x 2 grid for three or
    four, each scaled to fit its cell with its aspect kept."""
    images = images[:SHEET_IMAGES]
    if len(images) == 1:
        return images[0]
    cols, rows = 2, (1 if len(images) == 2 else 2)
    cw, ch = (side - SHEET_GUTTER) // cols, (side - SHEET_GUTTER * (rows - 1)) // rows if rows > 1 else side
    sheet = Image.new("RGB", (side, side), (255, 255, 255))
    for k, im in enumerate(images):
        cell = im.convert("RGB").copy()
        cell.thumbnail((cw, ch), Image.Resampling.BICUBIC)
        x0, y0 = (k % cols) * (cw + SHEET_GUTTER), (k // cols) * (ch + SHEET_GUTTER)
        sheet.paste(cell, (x0 + (cw - cell.width) // 2, y0 + (ch - cell.height) // 2))
    return sheet


class VlmInputs:
    """Qwen patches at the fixed resolution, the prompt body's token ids and the decoder's options."""

    def __init__(self, qwen_dir: str, version: str):
        from transformers import AutoTokenizer

        self.pixels = QwenPixels(qwen_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
        self.prompts = PromptBuilder(self.tokenizer, self.pixels.num_visual_tokens)
        self.version = version

    def _cap(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """`text` cut to its first `max_tokens` plain-text tokens (the ids go back to characters: the body is
        tokenized in one piece with the prompt's wording around it)."""
        ids = self.prompts.text_ids(text)
        if len(ids) <= max_tokens:
            return text, False
        # one sequence decodes to one str (transformers annotates str | list[str])
        return self.tokenizer.decode(ids[:max_tokens]), True  # type: ignore[return-value]

    def __call__(self, post: Post, image_text: str = "") -> tuple[np.ndarray, np.ndarray, DecoderOptions]:
        """`image_text`: the words OCR read in the image (preprocess), capped at the policy's prompt_max_tokens."""
        self.prompts.check(post.policy)  # answer options are one token each, or the post fails with bad_policy
        pixel_values, _ = self.pixels(contact_sheet([im.frames[0] for im in post.images]) if len(post.images) > 1
                                      else post.image)
        caption, truncated = self._cap(post.caption, MAX_CAPTION_TOKENS)
        image_text, _ = self._cap(image_text, post.policy.ocr.prompt_max_tokens) if image_text else ("", False)
        body = np.asarray(self.prompts.body_ids(post.policy, post.lang, caption, image_text), dtype=np.int64)
        options = DecoderOptions(policy_name=post.options.policy, policy_pin=pin_of(post.policy), lang=post.lang,
                                 describe=post.options.describe,
                                 caption_truncated=truncated, vlm_preprocess_version=self.version)
        return pixel_values, body, options
