"""Part b: the verdict from one prefill (VerdictDecoder.score) vs the seed's path, generate(max_new_tokens=200)
then parse the text, on the same decoder (in-process)."""
from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

from perf.harness import DecoderInputs, UniquePosts, options, spread

SEED_PROMPT = ("Answer in JSON with keys violation (true/false), labels (list), sentiment and description.")


def parse_seed_answer(text: str) -> dict | None:
    """The seed path's parser: the first {...} in the generated text, as JSON."""
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        return None
    try:
        return json.loads(m.group(0))
    except json.JSONDecodeError:
        return None


def bench_b(checkpoint: Path, repo: Path, posts: UniquePosts, runs: int, label: str) -> dict:
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    from moderation.vlm.decoder import VerdictDecoder

    # 1 thread: on 2 cores shared with other work, 2 torch threads spin against each other and made the tiny
    # decoder's verdict 20-30x slower (measured: ~30 ms with 1 thread vs 700-2500 ms with 2 at load ~9)
    torch.set_num_threads(1)
    dec = VerdictDecoder(checkpoint)
    make_request = DecoderInputs(repo)
    builder = dec.prompts(make_request.num_visual_tokens)
    pre, gen, parsed, gen_tokens = [], [], 0, []
    for r in range(runs + 1):  # run 0 is a warm-up
        image, text = posts.next()
        req, _ = make_request(image, text, options("default"))
        t0 = time.perf_counter()
        dec.score([req])
        t1 = time.perf_counter()
        # the seed's path: the whole prompt (system prefix + image + caption + an instruction to answer in
        # JSON), then generate(max_new_tokens=200) and parse. min_new_tokens=200: a random model may stop
        # early at random; a real one writing labels + description uses most of its 200-token cap.
        ids = builder.prefix_ids(req.policy, req.lang) + list(req.body_ids) + \
            dec.tokenizer.encode(SEED_PROMPT, add_special_tokens=False)
        input_ids = torch.tensor([ids])
        mm = BaseModelOutputWithDeepstackFeatures(
            pooler_output=(torch.from_numpy(req.visual_tokens),),
            deepstack_features=[(torch.from_numpy(layer),) for layer in req.deepstack])
        grid = torch.tensor([[1, 28, 28]])
        with torch.no_grad():
            t2 = time.perf_counter()
            out = dec.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     mm_token_type_ids=(input_ids == dec.config.image_token_id).int(),
                                     image_grid_thw=grid, mm_encoder_outputs={"image": mm},
                                     max_new_tokens=200, min_new_tokens=200, do_sample=False)
            answer = dec.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            ok = parse_seed_answer(answer) is not None
            t3 = time.perf_counter()
        if r == 0:
            continue
        pre.append((t1 - t0) * 1e3)
        gen.append((t3 - t2) * 1e3)
        gen_tokens.append(int(out.shape[1] - len(ids)))
        parsed += ok
        print(f"[bench] b {label} run {r}: prefill verdict {pre[-1]:.1f} ms, generate-200 {gen[-1]:.0f} ms",
              flush=True)
    ratios = [g_ / p_ for g_, p_ in zip(gen, pre, strict=True)]
    return {"decoder": label, "checkpoint": str(checkpoint.relative_to(checkpoint.parents[2])),
            "prefill_verdict_ms": spread(pre), "generate200_ms": spread(gen), "generated_tokens": gen_tokens,
            "speedup": spread(ratios), "goal_met": statistics.median(ratios) >= 10,
            "seed_answers_parsed": f"{parsed}/{len(gen)} (untrained model: its text is noise)"}
