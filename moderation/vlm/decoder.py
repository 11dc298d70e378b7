"""The language decoder's verdict: Qwen3-VL's language model reads the ONNX vision encoder's tokens and
answers fixed-option questions from next-token logits.

Cost per batch: the policy prefix KV is computed once per (policy, language) and reused; one prefill of
the post bodies (image tokens + caption) for the whole padded batch; then every question of every post
scored in one pass over the posts' KV (a few tokens each; the questions of a post share its KV through a
block-diagonal mask instead of copying it per question). A description is decoded (greedy, capped) only for
posts that ask for one, on the same KV. The KV held at each step is what moderation.preflight plans for."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.contracts import VlmVerdict
from ..core.policy import Policy
from ..core.text import Lang
from .prompts import PromptBuilder, Question

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache


@dataclass
class DecoderRequest:
    body_ids: np.ndarray           # int64 [L]
    visual_tokens: np.ndarray      # float32 [N, H]
    deepstack: np.ndarray          # float32 [n_layers, N, H]
    policy: Policy
    lang: Lang = "en"
    describe: bool = False


@dataclass
class DecoderResult:
    violation: float
    labels: dict[str, float]
    sentiment: dict[str, float]
    description: str | None = None
    description_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    def verdict(self, *, untrained: bool, caption_truncated: bool, model_versions: dict[str, str]) -> VlmVerdict:
        """The VLM_RESULT contract of this answer."""
        return VlmVerdict(violation=self.violation, labels=self.labels, sentiment=self.sentiment,
                          description=self.description, untrained=untrained, caption_truncated=caption_truncated,
                          model_versions=model_versions, timings_ms=self.timings_ms)


@dataclass
class QuestionLogits:
    """Next-token logits [B * Q, vocab] after every question of every post of one group, and how long each step
    took (prefix, prefill, describe, questions; ms)."""
    logits: torch.Tensor
    questions: list[Question]
    timings_ms: dict[str, float]
    descriptions: list[str | None]
    description_tokens: list[int]


@dataclass
class PrefilledGroup:
    """A group's KV after its body prefill: cache [B, P + L] (prefix + right-padded bodies), mask [B, P + L] of the
    valid tokens, next_pos [B] (the rope position after each body)."""
    builder: PromptBuilder
    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor
    prefix_ms: float


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None)


class QuestionBlock:
    """The questions of one (policy, language) as one token sequence: ids [S] (the questions one after another),
    offsets [S] (a token's place within its question: positions restart at the body's end for each question),
    last [Q] (where each question's next-token logits are read)."""

    def __init__(self, questions: list[Question]):
        ids: list[int] = []
        owner: list[int] = []
        offsets: list[int] = []
        last: list[int] = []
        for j, q in enumerate(questions):
            ids += q.ids
            owner += [j] * len(q.ids)
            offsets += range(len(q.ids))
            last.append(len(ids) - 1)
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.owner = torch.tensor(owner, dtype=torch.long)
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        self.last = torch.tensor(last, dtype=torch.long)

    def attention_mask(self, past_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive 4D mask [B, 1, S, past + S]: every question token sees the post's valid past tokens
        (`past_mask` [B, past], bool) and the earlier tokens of its own question, nothing of the other questions."""
        S, dev = len(self.ids), past_mask.device
        owner = self.owner.to(dev)
        own = (owner[:, None] == owner[None, :]) & torch.tril(torch.ones(S, S, dtype=torch.bool, device=dev))
        allowed = torch.cat([past_mask[:, None, :].expand(-1, S, -1), own[None].expand(len(past_mask), -1, -1)], -1)
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return blocked[:, None]


def select_device(prefer: str = "auto") -> torch.device:
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


class VerdictDecoder:
    def __init__(self, checkpoint_dir: str | Path, *, device: str = "auto", dtype: str = "auto",
                 drop_vision: bool = True, reuse_prefix: bool = True, quantization: str | None = None,
                 adapter: str | Path | None = None):
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        from .int8 import quantize_decoder

        self.device = select_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=self.dtype).eval()
        if drop_vision:  # visual tokens come from the ONNX vision_encoder
            self.model.model.visual = None
        self.adapter = None
        if adapter is not None:  # a PEFT LoRA, merged into the weights: no per-token adapter cost
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload().eval()
            self.adapter = Path(adapter).name
        # int8 after merging (the adapter's deltas are quantized with the weights they modify) and on the CPU, before
        # the weights reach the device: the full-precision copy never occupies GPU memory
        self.model, self.quantization, self.quantized_layers = quantize_decoder(self.model, quantization, self.device)
        self.model.to(self.device)
        # e.g. "cuda:bfloat16" or "cpu:float32+int8_dynamic", for logs, results and perf records
        suffix = "" if self.quantization == "none" else f"+{self.quantization}"
        self.device_label = f"{self.device.type}:{dtype}{suffix}"
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        self.config = self.model.config
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = {i for i in (self.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                    self.tokenizer.eos_token_id) if i is not None}
        self.reuse_prefix = reuse_prefix
        self._builders: dict[int, PromptBuilder] = {}
        self._prefix_kv: dict[tuple, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.untrained = (Path(checkpoint_dir) / "UNTRAINED.json").exists()
        self.stats = {"prefix_computed": 0, "prefix_reused": 0}
        # bytes of KV the last group's cache held after its body prefill, its question pass and its descriptions
        self.kv_bytes: dict[str, int] = {}

    # prompts ---------------------------------------------------------------------------------
    def prompts(self, num_visual_tokens: int) -> PromptBuilder:
        # one builder per image size, so its tokenized questions are cached across batches
        builder = self._builders.get(num_visual_tokens)
        if builder is None:
            shared = next(iter(self._builders.values()), None)  # one plain-text tokenizer for every image size
            builder = self._builders[num_visual_tokens] = PromptBuilder(
                self.tokenizer, num_visual_tokens, plain=shared.plain if shared else None)
        return builder

    def _prefix(self, builder: PromptBuilder, policy: Policy, lang: Lang):
        key = (policy.id, policy.digest, lang)
        hit = self._prefix_kv.get(key) if self.reuse_prefix else None
        if hit is not None:
            self.stats["prefix_reused"] += 1
            return hit
        ids = builder.prefix_ids(policy, lang)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.reuse_prefix):  # cached KV keeps no graph
            out = self.model.model.language_model(
                input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        kv = [(k, v) for k, v, *_ in out.cache]
        self.stats["prefix_computed"] += 1
        if self.reuse_prefix:
            self._prefix_kv[key] = (ids, kv)
        return ids, kv

    def _text_positions(self, start: torch.Tensor, length: int) -> torch.Tensor:
        return (start[:, None] + torch.arange(length, device=self.device)[None, :])[None].expand(3, -1, -1)

    # the verdict ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[DecoderRequest]) -> list[DecoderResult]:
        """Group by (policy, language) and score each group as one padded batch."""
        results: list[DecoderResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.policy.id, r.policy.digest, r.lang), []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._score_group([requests[i] for i in idx]), strict=False):
                results[i] = res
        return results  # type: ignore[return-value]

    def _score_group(self, reqs: list[DecoderRequest]) -> list[DecoderResult]:
        got = self.question_logits(reqs)
        policy, qs = reqs[0].policy, got.questions
        out = []
        for b in range(len(reqs)):
            probs = {}
            for j, q in enumerate(qs):
                option_logits = got.logits[b * len(qs) + j, list(q.option_ids)]
                probs[q.name] = dict(zip(q.options, torch.softmax(option_logits, -1).tolist(), strict=True))
            out.append(DecoderResult(
                violation=probs["violation"]["yes"],
                labels={lab: probs[lab]["yes"] for lab in policy.label_keys},
                sentiment=probs["sentiment"], description=got.descriptions[b],
                description_tokens=got.description_tokens[b], timings_ms=dict(got.timings_ms)))
        return out

    def question_logits(self, reqs: list[DecoderRequest]) -> QuestionLogits:
        """Next-token logits [B * Q, vocab] after every question of every post of one (policy, language) group.
        Differentiable outside no_grad with reuse_prefix=False: export/train_lora.py fits adapters through it."""
        t0 = time.perf_counter()
        group = self.prefill(reqs)
        t_body = time.perf_counter()
        self.kv_bytes = {"body": cache_bytes(group.cache)}
        qs = group.builder.questions(reqs[0].policy, reqs[0].lang)
        logits = self.question_pass(group, qs)
        t_q = time.perf_counter()
        descriptions, n_described = self._describe(reqs, group.builder, group.cache, group.mask, group.next_pos)
        t_desc = time.perf_counter()
        timings = {"prefix": group.prefix_ms, "prefill": (t_body - t0) * 1e3 - group.prefix_ms,
                   "questions": (t_q - t_body) * 1e3, "describe": (t_desc - t_q) * 1e3}
        return QuestionLogits(logits, qs, timings, descriptions, n_described)

    def prefill(self, reqs: list[DecoderRequest]) -> PrefilledGroup:
        """The policy prefix KV (cached) and one right-padded prefill of every post's body on top of it."""
        from transformers.cache_utils import DynamicCache
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        t0 = time.perf_counter()
        policy, lang, dev = reqs[0].policy, reqs[0].lang, self.device
        n_vis = reqs[0].visual_tokens.shape[0]
        builder = self.prompts(n_vis)
        prefix_ids, prefix_kv = self._prefix(builder, policy, lang)
        P, B = len(prefix_ids), len(reqs)
        prefix_ms = (time.perf_counter() - t0) * 1e3

        lens = [len(r.body_ids) for r in reqs]
        L = max(lens)
        body = torch.full((B, L), self.pad_id, dtype=torch.long)
        body_mask = torch.zeros((B, L), dtype=torch.long)
        pos = torch.zeros((3, B, L), dtype=torch.long)
        next_pos = torch.zeros(B, dtype=torch.long)
        grid = torch.tensor([[1, int(round((n_vis * 4) ** 0.5)), int(round((n_vis * 4) ** 0.5))]])
        for b, r in enumerate(reqs):
            ids = torch.as_tensor(r.body_ids, dtype=torch.long)
            body[b, :lens[b]] = ids
            body_mask[b, :lens[b]] = 1
            full = torch.cat([torch.tensor(prefix_ids), ids])[None]
            p, _ = self.model.model.get_rope_index(
                full, mm_token_type_ids=(full == self.config.image_token_id).int(), image_grid_thw=grid)
            pos[:, b, :lens[b]] = p[:, 0, P:]
            next_pos[b] = p.max() + 1
        vis = torch.from_numpy(np.stack([r.visual_tokens for r in reqs])).to(dev, self.dtype)
        ds = torch.from_numpy(np.stack([r.deepstack for r in reqs])).to(dev, self.dtype)
        # Qwen3-VL reads one tensor per image here (transformers annotates a single Tensor)
        mm = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(vis),  # type: ignore[arg-type]
            deepstack_features=[tuple(ds[:, j]) for j in range(ds.shape[1])])  # type: ignore[misc]
        shared = [(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous()) for k, v in prefix_kv]
        cache = DynamicCache(ddp_cache_data=shared, config=self.config)
        mask = torch.cat([torch.ones((B, P), dtype=torch.long), body_mask], dim=1).to(dev)
        self.model.model(input_ids=body.to(dev), attention_mask=mask, position_ids=pos.to(dev), cache=cache,
                         mm_encoder_outputs={"image": mm}, use_cache=True)
        return PrefilledGroup(builder, cache, mask, next_pos, prefix_ms)

    def question_pass(self, group: PrefilledGroup, questions: list[Question]) -> torch.Tensor:
        """Next-token logits [B * Q, vocab] of every question of every post, in one pass over the posts' own KV
        (B rows, not B * Q): a post's questions are one sequence after its body, each question attending to
        prefix + body and to its own tokens only, with positions restarting at the body's end, so its logits are
        those of the question alone. The cache is left as it was (prefix + body)."""
        dev, cache = self.device, group.cache
        B = len(group.next_pos)
        block = QuestionBlock(questions)
        qmask = block.attention_mask(group.mask.bool(), self.dtype)
        qpos = (group.next_pos[:, None] + block.offsets[None, :])[None].expand(3, -1, -1)
        hidden = self.model.model.language_model(
            inputs_embeds=self.model.model.get_input_embeddings()(block.ids[None].expand(B, -1).to(dev)),
            attention_mask=qmask, position_ids=qpos.to(dev), cache=cache, use_cache=True).last_hidden_state
        self.kv_bytes["questions"] = cache_bytes(cache)
        cache.crop(-len(block.ids))
        picked = hidden[:, block.last.to(dev)].reshape(B * len(questions), -1)
        return self.model.lm_head(picked).float()

    def _describe(self, reqs, builder, cache, mask, next_pos) -> tuple[list[str | None], list[int]]:
        """Greedy descriptions (capped at the policy's describe_max_tokens) for the posts that ask for one. Consumes
        `cache` (prefix + body KV of the group): the describing rows are selected in place, never copied."""
        rows = [b for b, r in enumerate(reqs) if r.describe]
        out: list[str | None] = [None] * len(reqs)
        counts = [0] * len(reqs)
        if not rows:
            return out, counts
        policy, lang, dev = reqs[0].policy, reqs[0].lang, self.device
        sel = torch.tensor(rows, device=dev)
        c = cache
        if len(rows) < len(reqs):
            c.batch_select_indices(sel)
        m = mask[sel]
        start = next_pos[rows].to(dev)
        ids = torch.tensor([builder.describe_ids(policy, lang)] * len(rows), device=dev)
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(policy.decoder.describe_max_tokens):
            n = ids.shape[1]
            m = torch.cat([m, torch.ones((len(rows), n), dtype=m.dtype, device=dev)], dim=1)
            h = self.model.model.language_model(
                inputs_embeds=self.model.model.get_input_embeddings()(ids), attention_mask=m,
                position_ids=self._text_positions(start, n), cache=c, use_cache=True).last_hidden_state
            start = start + n
            self.kv_bytes["describe"] = cache_bytes(c)
            nxt = self.model.lm_head(h[:, -1]).argmax(-1)  # greedy: deterministic descriptions
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in self.eos_ids:
                        done[i] = True
                    else:
                        generated[i].append(t)
            if all(done):
                break
            ids = nxt[:, None]
        for i, b in enumerate(rows):
            # one sequence decodes to one str (transformers annotates str | list[str])
            text: str = self.tokenizer.decode(generated[i], skip_special_tokens=True)  # type: ignore[assignment]
            out[b] = text.strip()
            counts[b] = len(generated[i])
        return out, counts

