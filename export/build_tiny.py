"""Build the embedded default checkpoints: tiny, random-initialised Qwen3-VL and CLIP.

They use the real transformers classes (Qwen3VLForConditionalGeneration with DeepStack, CLIPModel)
at toy sizes so the whole serving path runs on a 2-core CPU with no model hub. Their weights are
random: every output they give is noise, and the service labels it `untrained`.

    .venv/bin/python -m export.build_tiny --out build/checkpoints

Real checkpoints skip this step: pass their directories to `export.export_models`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEED = 20261125
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def _corpus() -> list[str]:
    """Training text for the toy BPE: the policy's prompts and options plus sample captions,
    so that answer options ("yes", "no", "是", "否", label keys) become single tokens."""
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


def build_tokenizer(special_tokens: list[str], vocab_size: int, **wrap_kwargs):
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
    tokenizer = build_tokenizer(
        QWEN_SPECIAL_TOKENS, 1024,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
    tokenizer = build_tokenizer(
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
