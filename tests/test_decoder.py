"""The decoder's one-prefill verdict, fed by the exported ONNX vision encoder, equals what a plain
transformers call on the full prompt (with transformers' own vision tower) gives."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moderation.core.imaging import decode_image
from moderation.core.policy import load_policy
from moderation.core.text import detect_lang
from moderation.testing.samples import sample_posts
from moderation.vlm.decoder import DecoderRequest, VerdictDecoder
from moderation.vlm.inputs import QwenPixels

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "model_repository" / "language_decoder" / "1" / "checkpoint"
ONNX = ROOT / "model_repository" / "vision_encoder" / "1" / "model.onnx"
TOL = 1e-4


@pytest.fixture(scope="module")
def parts():
    from transformers import Qwen3VLForConditionalGeneration

    plain = Qwen3VLForConditionalGeneration.from_pretrained(CKPT).eval()
    dec = VerdictDecoder(CKPT)
    qp = QwenPixels(str(CKPT))
    sess = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    return plain, dec, qp, sess


def _requests(parts, posts, describe=False):
    _, dec, qp, sess = parts
    pol = load_policy()
    builder = dec.prompts(qp.num_visual_tokens)
    reqs, raw = [], []
    for p in posts:
        pv, grid = qp(decode_image(p.image_bytes()).image)
        tok, ds = sess.run(None, {"PIXEL_VALUES": pv[None]})
        lang = detect_lang(p.text)
        body = np.array(builder.body_ids(pol, lang, p.text))
        reqs.append(DecoderRequest(body, tok[0], ds[0], pol, lang, describe))
        raw.append((pv, grid, body, lang))
    return reqs, raw, builder, pol


def _plain_probs(plain, builder, pol, pv, grid, body, lang):
    out = {}
    prefix = builder.prefix_ids(pol, lang)
    for q in builder.questions(pol, lang):
        ids = torch.tensor([prefix + body.tolist() + list(q.ids)])
        with torch.no_grad():
            logits = plain(input_ids=ids, pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                           mm_token_type_ids=(ids == plain.config.image_token_id).int()).logits[0, -1]
        out[q.name] = dict(zip(q.options, torch.softmax(logits[list(q.option_ids)], -1).tolist(), strict=False))
    return out


def test_padded_batch_verdict_matches_plain_transformers(parts):
    plain, dec, _, _ = parts
    posts = sample_posts()[:4]  # en and zh captions of different lengths -> a padded batch
    reqs, raw, builder, pol = _requests(parts, posts)
    results = dec.score(reqs)
    for res, (pv, grid, body, lang) in zip(results, raw, strict=False):
        ref = _plain_probs(plain, builder, pol, pv, grid, body, lang)
        assert abs(res.violation - ref["violation"]["yes"]) < TOL
        for lab in pol.label_keys:
            assert abs(res.labels[lab] - ref[lab]["yes"]) < TOL, lab
        for k, v in ref["sentiment"].items():
            assert abs(res.sentiment[k] - v) < TOL


def test_prefix_kv_reuse_gives_the_same_scores(parts):
    _, dec, _, _ = parts
    reqs, *_ = _requests(parts, sample_posts()[:2])
    fresh = VerdictDecoder(CKPT, reuse_prefix=False)
    a, b = dec.score(reqs), fresh.score(reqs)
    again = dec.score(reqs)
    assert dec.stats["prefix_reused"] >= 1 and fresh.stats["prefix_reused"] == 0
    for x, y, z in zip(a, b, again, strict=False):
        assert abs(x.violation - y.violation) < 1e-6 and abs(x.violation - z.violation) < 1e-6
        assert max(abs(x.labels[k] - y.labels[k]) for k in x.labels) < 1e-6


def test_description_only_when_asked_and_capped(parts):
    _, dec, _, _ = parts
    reqs, *_ = _requests(parts, sample_posts()[:2])
    reqs[1].describe = True
    res = dec.score(reqs)
    assert res[0].description is None
    assert isinstance(res[1].description, str)
    assert 0 < res[1].description_tokens <= load_policy().decoder.describe_max_tokens


def _expanded_question_logits(dec, group, questions):
    """The question pass as it was before the KV was shared: the post's KV copied once per question
    (batch_repeat_interleave), the questions right-padded, one row per (post, question)."""
    from moderation.vlm.decoder import cache_bytes

    B, Q = len(group.next_pos), len(questions)
    C = max(len(q.ids) for q in questions)
    cont = torch.full((B * Q, C), dec.pad_id, dtype=torch.long)
    cont_mask = torch.zeros((B * Q, C), dtype=torch.long)
    last = torch.zeros(B * Q, dtype=torch.long)
    for b in range(B):
        for j, q in enumerate(questions):
            cont[b * Q + j, :len(q.ids)] = torch.tensor(q.ids)
            cont_mask[b * Q + j, :len(q.ids)] = 1
            last[b * Q + j] = len(q.ids) - 1
    group.cache.batch_repeat_interleave(Q)
    mask = torch.cat([group.mask.repeat_interleave(Q, dim=0), cont_mask], dim=1)
    pos = (group.next_pos.repeat_interleave(Q)[:, None] + torch.arange(C)[None])[None].expand(3, -1, -1)
    hidden = dec.model.model.language_model(
        inputs_embeds=dec.model.model.get_input_embeddings()(cont), attention_mask=mask, position_ids=pos,
        cache=group.cache, use_cache=True).last_hidden_state
    return dec.model.lm_head(hidden[torch.arange(B * Q), last]).float(), cache_bytes(group.cache)


def test_shared_kv_question_pass_matches_the_per_question_copy(parts):
    _, dec, _, _ = parts
    reqs, _, builder, pol = _requests(parts, sample_posts()[:3])  # bodies of different lengths: padded rows
    questions = builder.questions(pol, reqs[0].lang)
    with torch.no_grad():
        shared = dec.question_pass(dec.prefill(reqs), questions)
        expanded, expanded_bytes = _expanded_question_logits(dec, dec.prefill(reqs), questions)
    assert shared.shape == expanded.shape == (len(reqs) * len(questions), dec.config.text_config.vocab_size)
    assert torch.allclose(shared, expanded, atol=1e-4), (shared - expanded).abs().max()
    # the shared pass holds each post's KV once, the copy held it once per question
    assert dec.kv_bytes["questions"] * 2 < expanded_bytes
