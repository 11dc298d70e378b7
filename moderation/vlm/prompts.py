"""Qwen3-VL prompts for the one-prefill verdict, built from the policy in zh or en.

Layout (Qwen chat format):
    prefix   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n          shared by every post
    body     <|vision_start|><|image_pad|>*N<|vision_end|>{caption}{image text}<|im_end|>\n{generation prompt}
    question "violation:" | "{label}:" | "sentiment:"    one short continuation per answer read
The verdict reads the next-token distribution over each question's fixed options (" yes"/" no", ...),
so a post costs one prefill of prefix+body plus a few tokens per question, never free-text decoding.

Control tokens come only from this module's constants and the checkpoint's chat template. Every other string
(the caption, the image's text, the policy's wording) is tokenized as plain text by the checkpoint's BPE without
its added tokens, so a caption that spells `<|im_end|>` or `<|image_pad|>` reads as those characters and can
neither forge a turn nor change the number of image tokens."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.errors import BadPolicy, BadRequest
from ..core.policy import Lang, Policy

IMAGE_PAD = "<|image_pad|>"
QWEN_GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclass(frozen=True)
class Question:
    name: str               # "violation", a label key, or "sentiment"
    ids: tuple[int, ...]    # continuation token ids
    options: tuple[str, ...]        # option keys, e.g. ("yes", "no")
    option_ids: tuple[int, ...]     # the one token of each option


class PlainText:
    """The checkpoint's tokenizer without its added tokens: byte-level BPE over the whole string, so any text
    becomes ordinary vocabulary ids ("<|im_end|>" -> "<", "|", "im", "_end", ...)."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["added_tokens"] = []
        spec["post_processor"] = None
        self.tok = Tokenizer.from_str(json.dumps(spec))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.control_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.control_ids.intersection(ids):  # a vocabulary that keeps control strings among its BPE entries
            raise BadRequest("text cannot be encoded as plain text for the language model (it tokenizes to a "
                             "control token)")
        return ids


def generation_prompt(tokenizer) -> str:
    """What opens the assistant's turn, from the checkpoint's chat template. A template that opens a thinking
    block (Qwen3-VL-Thinking: `<think>\\n`) gets it closed empty, so the answer options follow directly, as with
    `enable_thinking=False`; a template that is not Qwen's chat format is refused."""
    if not getattr(tokenizer, "chat_template", None):
        return QWEN_GENERATION_PROMPT
    turn = [{"role": "user", "content": "x"}]
    opened = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    prompt = opened[len(closed):] if opened.startswith(closed) else None
    if not prompt or not prompt.startswith(QWEN_GENERATION_PROMPT):
        raise ValueError(f"the checkpoint's chat template opens the answer with {prompt!r}, not Qwen's "
                         f"{QWEN_GENERATION_PROMPT!r}: the verdict's prompt layout does not apply to it")
    rest = prompt[len(QWEN_GENERATION_PROMPT):]
    if rest.strip() == "<think>":
        return QWEN_GENERATION_PROMPT + "<think>\n\n</think>\n\n"
    if rest.strip():
        raise ValueError(f"the checkpoint's chat template adds {rest!r} after the assistant header; the "
                         "verdict reads answers right after it and would be mis-scored")
    return prompt


class PromptBuilder:
    def __init__(self, tokenizer, num_visual_tokens: int, plain: PlainText | None = None):
        self.tok = tokenizer
        self.plain = plain or PlainText(tokenizer)  # builders of one tokenizer can share it: it copies the vocabulary
        self.num_visual_tokens = num_visual_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.generation_prompt = generation_prompt(tokenizer)
        self.closes_thinking = "</think>" in self.generation_prompt
        self._questions: dict[tuple[str, str], list[Question]] = {}

    def _control(self, markup: str) -> list[int]:
        """Ids of this module's own markup (control tokens and the newlines between them)."""
        return self.tok.encode(markup, add_special_tokens=False)

    def text_ids(self, text: str) -> list[int]:
        return self.plain.encode(text)

    def prefix_ids(self, policy: Policy, lang: Lang) -> list[int]:
        p = policy.prompts[lang]
        system = p.system.format(labels=", ".join(policy.label_names(lang)))
        return (self._control("<|im_start|>system\n") + self.text_ids(system)
                + self._control("<|im_end|>\n<|im_start|>user\n"))

    def body_ids(self, policy: Policy, lang: Lang, caption: str, image_text: str = "") -> list[int]:
        p = policy.prompts[lang]
        vision = "<|vision_start|>" + IMAGE_PAD * self.num_visual_tokens + "<|vision_end|>"
        caption_line = p.caption.format(caption=caption) if caption else ""
        text_line = ("\n" + p.image_text.format(text=image_text)) if image_text and p.image_text else ""
        return (self._control(vision) + self.text_ids(caption_line + text_line)
                + self._control("<|im_end|>\n" + self.generation_prompt))

    def describe_ids(self, policy: Policy, lang: Lang) -> list[int]:
        return self.text_ids(policy.prompts[lang].describe)

    def check(self, policy: Policy) -> None:
        """Raise BadPolicy naming the option when one of the policy's answer options is not exactly one token."""
        for lang in policy.prompts:
            self.questions(policy, lang)

    def questions(self, policy: Policy, lang: Lang) -> list[Question]:
        key = (f"{policy.id}#{policy.digest}", lang)
        if key not in self._questions:
            p = policy.prompts[lang]
            yes_no = (("yes", "no"), (p.yes, p.no))
            specs: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [("violation", p.violation, *yes_no)]
            specs += [(lab.key, p.label.format(name=getattr(lab, lang)), *yes_no) for lab in policy.labels]
            specs.append(("sentiment", p.sentiment, tuple(s.key for s in policy.sentiment),
                          tuple(getattr(s, lang) for s in policy.sentiment)))
            out = []
            for name, text, keys, option_texts in specs:
                option_ids = []
                for option in option_texts:
                    ids = self.text_ids(option)
                    if len(ids) != 1:  # scoring the first token of a longer option reads another answer
                        raise BadPolicy(f"policy {policy.id} ({lang}): answer option {option!r} of {name!r} is "
                                        f"{len(ids)} tokens with this model's tokenizer; every option must be one "
                                        "token: reword it")
                    option_ids.append(ids[0])
                if len(set(option_ids)) != len(option_ids):
                    raise BadPolicy(f"policy {policy.id} ({lang}): options {option_texts} for {name!r} are the "
                                    "same token with this model's tokenizer; reword them")
                out.append(Question(name, tuple(self.text_ids(text)), keys, tuple(option_ids)))
            self._questions[key] = out
        return self._questions[key]
