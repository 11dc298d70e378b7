"""Qwen3-VL prompts for the one-prefill verdict, built from the policy in zh or en.

Layout (Qwen chat format):
    prefix   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n          shared by every post
    body     <|vision_start|><|image_pad|>*N<|vision_end|>{caption}{image text}<|im_end|>\n<|im_start|>assistant\n
    question "violation:" | "{label}:" | "sentiment:"    one short continuation per answer read
The verdict reads the next-token distribution over each question's fixed options (" yes"/" no", ...),
so a post costs one prefill of prefix+body plus a few tokens per question, never free-text decoding."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.policy import Policy

IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class Question:
    name: str               # "violation", a label key, or "sentiment"
    ids: tuple[int, ...]    # continuation token ids
    options: tuple[str, ...]        # option keys, e.g. ("yes", "no")
    option_ids: tuple[int, ...]     # first token of each option


class PromptBuilder:
    def __init__(self, tokenizer, num_visual_tokens: int):
        self.tok = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._questions: dict[tuple[str, str], list[Question]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def prefix_ids(self, policy: Policy, lang: str) -> list[int]:
        p = policy.prompts[lang]
        system = p.system.format(labels=", ".join(policy.label_names(lang)))
        return self._ids(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")

    def body_ids(self, policy: Policy, lang: str, caption: str, image_text: str = "") -> list[int]:
        p = policy.prompts[lang]
        vision = "<|vision_start|>" + IMAGE_PAD * self.num_visual_tokens + "<|vision_end|>"
        caption_line = p.caption.format(caption=caption) if caption else ""
        text_line = ("\n" + p.image_text.format(text=image_text)) if image_text and p.image_text else ""
        return self._ids(f"{vision}{caption_line}{text_line}<|im_end|>\n<|im_start|>assistant\n")

    def describe_ids(self, policy: Policy, lang: str) -> list[int]:
        return self._ids(policy.prompts[lang].describe)

    def questions(self, policy: Policy, lang: str) -> list[Question]:
        key = (f"{policy.id}#{policy.digest}", lang)
        if key not in self._questions:
            p = policy.prompts[lang]
            yes_no = (("yes", "no"), (p.yes, p.no))
            specs = [("violation", p.violation, *yes_no)]
            specs += [(lab.key, p.label.format(name=getattr(lab, lang)), *yes_no) for lab in policy.labels]
            specs.append(("sentiment", p.sentiment, tuple(s.key for s in policy.sentiment),
                          tuple(getattr(s, lang) for s in policy.sentiment)))
            out = []
            for name, text, keys, option_texts in specs:
                first = tuple(self._ids(o)[0] for o in option_texts)
                if len(set(first)) != len(first):
                    raise ValueError(f"policy {policy.id} ({lang}): options {option_texts} for {name!r} share a "
                                     "first token with this tokenizer; reword them")
                out.append(Question(name, tuple(self._ids(text)), keys, first))
            self._questions[key] = out
        return self._questions[key]
