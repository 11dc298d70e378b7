"""The pipeline's stages as plain library code. Each Triton python model wraps one stage (parse tensors ->
call this -> build tensors); the in-process benchmark and the tests call the same functions."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ModerationError
from .gate import ConceptBank, decide, gate_scores, score_sources, thresholds
from .imaging import ClipPixels, QwenPixels, decode_image, sha256_hex
from .options import Options, parse_options
from .policy import Policy, load_policy
from .text import decode_caption, detect_lang, text_sha256

CLIP_MAX_TOKENS = 77
MAX_CAPTION_TOKENS = 256  # caption tokens the VLM reads; longer captions are cut, and the result says so


@dataclass
class Post:
    """One decoded, validated post."""
    options: Options
    policy: Policy
    image_sha256: str
    text_sha256: str
    caption: str
    lang: str
    image: object  # PIL.Image, RGB
    meta: dict = field(default_factory=dict)

    def request_record(self) -> dict:
        return {"request_id": self.options.request_id, "policy": self.policy.id, "policy_name": self.options.policy,
                "describe": self.options.describe, "return_embedding": self.options.return_embedding,
                "lang": self.lang, "image_sha256": self.image_sha256, "text_sha256": self.text_sha256, **self.meta}


def hashes_of(image: bytes | None, text: bytes | None) -> dict:
    return {"image_sha256": sha256_hex(image) if isinstance(image, (bytes, bytearray)) else "",
            "text_sha256": text_sha256(text) if isinstance(text, (bytes, bytearray)) else ""}


def parse_post(image: bytes, text: bytes, options: Options | bytes | None, hashes: dict | None = None) -> Post:
    """Validate everything a client sent (OPTIONS raw, or already parsed); raises ModerationError with a code
    that names the problem. `hashes`: the post's hashes_of() when the caller already computed them."""
    if not isinstance(options, Options):
        options = parse_options(options)
    policy = load_policy(options.policy)
    caption = decode_caption(text)
    decoded = decode_image(image)
    lang = detect_lang(caption) if options.lang == "auto" else options.lang
    hashes = hashes or {"image_sha256": sha256_hex(bytes(image)),
                        "text_sha256": text_sha256(text if isinstance(text, bytes) else b"")}
    return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption,
                lang, decoded.image, {"image_format": decoded.format, "image_size": list(decoded.original_size)})


class ClipTokens:
    """CLIP's tokenizer (the checkpoint's tokenizer.json) through the `tokenizers` library alone: the
    gate loads in about a second instead of importing transformers and torch, which keeps hot swaps short."""

    def __init__(self, clip_dir: str, max_length: int = CLIP_MAX_TOKENS):
        import json
        from pathlib import Path

        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(clip_dir) / "tokenizer.json"))
        cfg = json.loads((Path(clip_dir) / "tokenizer_config.json").read_text())
        pad = cfg.get("pad_token") or cfg.get("eos_token")
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=self.tok.token_to_id(pad), pad_token=pad)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok.encode_batch(texts)
        return (np.array([e.ids for e in enc], dtype=np.int64),
                np.array([e.attention_mask for e in enc], dtype=np.int64))


class ClipInputs:
    """preprocess: CLIP pixels and tokens for one post."""

    def __init__(self, clip_dir: str):
        self.pixels = ClipPixels(clip_dir)
        self.tokens = ClipTokens(clip_dir)

    def __call__(self, post: Post) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, mask = self.tokens([post.caption])
        return self.pixels(post.image), ids[0], mask[0]


class VlmInputs:
    """vlm_preprocess: Qwen patches at the fixed resolution and the prompt body's token ids."""

    def __init__(self, qwen_dir: str):
        from transformers import AutoTokenizer

        from .prompts import PromptBuilder

        self.pixels = QwenPixels(qwen_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
        self.prompts = PromptBuilder(self.tokenizer, self.pixels.num_visual_tokens)

    def __call__(self, post: Post) -> tuple[np.ndarray, np.ndarray, dict]:
        pixel_values, _ = self.pixels(post.image)
        ids = self.tokenizer.encode(post.caption, add_special_tokens=False)
        truncated = len(ids) > MAX_CAPTION_TOKENS
        caption = self.tokenizer.decode(ids[:MAX_CAPTION_TOKENS]) if truncated else post.caption
        body = np.asarray(self.prompts.body_ids(post.policy, post.lang, caption), dtype=np.int64)
        info = {"policy": post.options.policy, "lang": post.lang, "describe": post.options.describe,
                "caption_truncated": truncated, "request_id": post.options.request_id}
        return pixel_values, body, info


class Gate:
    """clip_gate's decision for one post, given its CLIP embeddings and the policy's concept bank."""

    def __init__(self):
        self.banks: dict[str, ConceptBank] = {}

    def bank(self, policy: Policy, encode_texts) -> ConceptBank:
        """encode_texts(list[str]) -> [N, D] embeddings; called once per policy version."""
        bank = self.banks.get(policy.digest)
        if bank is None:
            texts = [t for _, t in ConceptBank.concept_texts(policy)]
            emb = encode_texts(texts) if texts else np.zeros((0, 1), np.float32)
            bank = self.banks[policy.digest] = ConceptBank.from_embeddings(policy, emb)
        return bank

    def __call__(self, policy: Policy, bank: ConceptBank, image_emb, text_emb, has_caption: bool,
                 nsfw_score: float | None = None) -> dict:
        scores, consistency = gate_scores(policy, bank, image_emb, text_emb if has_caption else None, nsfw_score)
        sources = score_sources(policy, nsfw_score)
        route, reason = decide(policy, scores, sources)
        out = {"route": route, "scores": scores, "consistency": consistency, "reason": reason}
        if sources:  # build_result labels these scores with their source and judges them by their thresholds
            out["sources"] = sources
            out["thresholds"] = {k: thresholds(policy, k, sources)[0] for k in sources}
        return out


__all__ = ["Post", "parse_post", "ClipInputs", "VlmInputs", "Gate", "ModerationError", "hashes_of"]
