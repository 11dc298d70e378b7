"""Build the embedded default checkpoints: tiny, random-initialised Qwen3-VL and CLIP.

They use the real transformers classes (Qwen3VLForConditionalGeneration with DeepStack, CLIPModel)
at toy sizes so the whole serving path runs on a 2-core CPU with no model hub. Their weights are
random: every output they give is noise, and the service labels it `untrained`. The Qwen3-VL model
has Qwen's real tokenizer (151,643 BPE ranks from the `dashscope` wheel plus the added tokens at their
published ids) and the real 151,936-row embedding, so prompts have their real token counts; CLIP keeps
a toy BPE trained on the policy's text.

    .venv/bin/python -m export.build_tiny --out build/checkpoints

Real checkpoints skip this step: pass their directories to `export.export_models`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED = 20261125
# Qwen3-VL's added tokens, in id order from 151643 (its tokenizer_config.json); `special` as published: the tool and
# think markers are added tokens that are not special.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
QWEN_FIRST_ADDED_ID = 151643
QWEN_VOCAB_SIZE = 151936  # the embedding's rows in every Qwen3-VL checkpoint (the tokenizer uses 151,669)
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
# Qwen3-VL-Instruct's chat template (system, user text and images, assistant, generation prompt; no tools).
QWEN_INSTRUCT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tiktoken_path() -> Path:
    """Qwen's BPE ranks as the `dashscope` wheel ships them (Apache-2.0; installed without dependencies and never
    imported: only this file is read)."""
    from importlib.metadata import distribution

    path = Path(str(distribution("dashscope").locate_file("dashscope/resources/qwen.tiktoken")))
    if not path.exists():
        raise SystemExit(f"error: {path} is missing: `pip install --no-deps dashscope` (requirements.lock pins it)")
    return path


def build_qwen_tokenizer(tiktoken_file: Path | None = None):
    """Qwen's real tokenizer from its tiktoken ranks: byte-level BPE with Qwen2's pre-tokenizer (transformers'
    Qwen2Tokenizer) and Qwen3-VL's added tokens at their published ids ("Hello world" -> [9707, 1879])."""
    import base64

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks: dict[bytes, int] = {}
    for line in (tiktoken_file or qwen_tiktoken_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)

    class _Ranks(TikTokenConverter):  # the converter reads ranks through the tiktoken package, not installed here
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    vocab, merges = _Ranks().extract_vocab_merges_from_model(None)
    if len(vocab) != QWEN_FIRST_ADDED_ID:
        raise SystemExit(f"error: expected {QWEN_FIRST_ADDED_ID} BPE ranks, got {len(vocab)}")
    # the class adds its eos/pad tokens as it starts: both <|endoftext|> at first, so that one takes 151643
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=262144)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in QWEN_ADDED_TOKENS])
    tok.add_special_tokens({"eos_token": "<|im_end|>",
                            "additional_special_tokens": [t for t, special in QWEN_ADDED_TOKENS[1:] if special]})
    for i, (t, _) in enumerate(QWEN_ADDED_TOKENS):
        if tok.convert_tokens_to_ids(t) != QWEN_FIRST_ADDED_ID + i:
            raise SystemExit(f"error: {t} got id {tok.convert_tokens_to_ids(t)}, not {QWEN_FIRST_ADDED_ID + i}")
    tok.chat_template = QWEN_INSTRUCT_CHAT_TEMPLATE
    return tok


def _corpus() -> list[str]:
    """Training text for the tiny CLIP's toy BPE: the policy's prompts, concepts and sample captions."""
    from moderation.core.policy import load_policy

    lines: list[str] = []
    policy = load_policy("default")
    for text in policy.all_prompt_text():
        lines.extend([text] * 20)
    lines += [
        "a photo of a cat", "a rocket launch", "a cup of coffee", "an astronaut in space", "the city at night",
        "岁月静好", "今天天气真好", "好可怕的火灾", "这是什么", "哈哈哈", "a happy day at the beach",
        "buy now cheap pills", "click the link to win money", "I love this so much", "what a disaster",
    ] * 10
    return lines


def build_toy_tokenizer(special_tokens: list[str], vocab_size: int, **wrap_kwargs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **wrap_kwargs)


def build_qwen3_vl(out: Path) -> Path:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(SEED)
    tokenizer = build_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=QWEN_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                             "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    path = out / "tiny-qwen3-vl"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                             min_pixels=448 * 448, max_pixels=448 * 448).save_pretrained(path)
    _mark_untrained(path, model)
    return path


def build_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(SEED + 1)
    tokenizer = build_toy_tokenizer(
        CLIP_SPECIAL_TOKENS, 1024, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=77,
    )
    # CLIP's text model pools at the EOS token: BOS ... EOS.
    from tokenizers.processors import TemplateProcessing
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=64,
    )
    model = CLIPModel(config).eval()
    path = out / "tiny-clip"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    _mark_untrained(path, model)
    return path


def _mark_untrained(path: Path, model) -> None:
    # The serving code reads this marker and reports `untrained: true` to every user.
    n = sum(p.numel() for p in model.parameters())
    (path / "UNTRAINED.json").write_text(json.dumps(
        {"untrained": True, "seed": SEED, "parameters": n,
         "note": "random-initialised tiny model of the real architecture; outputs are noise"}, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/checkpoints"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for p in (build_qwen3_vl(args.out), build_clip(args.out)):
        print(f"built {p}")


if __name__ == "__main__":
    main()
