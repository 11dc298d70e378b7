"""Fit a PEFT LoRA adapter on the language decoder from a small JSONL of labelled posts (slang the base
model does not know), and optionally release it as the next language_decoder version.

    .venv/bin/python -m export.train_lora --data export/data/slang_lora.jsonl --out build/lora/slang
    .venv/bin/python -m export.train_lora --data ... --out build/lora/slang --release model_repository

JSONL rows: {"image": "<path>" | "sample:<name>", "caption": str, "labels": {label_key: 0|1}, "violation": 0|1}
(labels left out count as 0). The loss is what the verdict reads: for every row, the policy's violation and
label questions (moderation.prompts, the policy's own language per caption), cross-entropy over the answer
options' first tokens (" yes" / " no") at the question's last token. Visual tokens come from the exported ONNX
vision encoder (frozen), exactly as served. CPU, tiny model: ~10-30 s.

Writes --out/adapter_config.json + adapter_model.safetensors (PEFT) and training.json (data sha256, settings,
loss and mean |score - label| before/after). With --release, language_decoder/<next>/ = the base version's
checkpoint + adapter/, with the adapter in its artifact record; `clients.admin swap` makes it live."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moderation.core.hashing import file_sha256
from moderation.core.policy import load_policy

QUESTIONS_SKIPPED = ("sentiment",)  # the rows carry no sentiment labels


def read_rows(path: Path) -> list[dict]:
    from moderation.testing.samples import image_paths

    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        img = r["image"]
        r["image_path"] = str(image_paths()[img[7:]] if img.startswith("sample:") else (path.parent / img))
        if not Path(r["image_path"]).exists():
            raise SystemExit(f"error: {path}:{i + 1}: no image {img}")
        rows.append(r)
    return rows


class Examples:
    """DecoderRequests of the rows grouped by language (one padded batch each, as served) and their targets."""

    def __init__(self, rows: list[dict], repo: Path, version: str, decoder, policy):
        import onnxruntime as ort

        from moderation.core.imaging import decode_image
        from moderation.core.text import detect_lang
        from moderation.vlm.decoder import DecoderRequest
        from moderation.vlm.inputs import QwenPixels

        qp = QwenPixels(str(repo / "vlm_preprocess" / version / "qwen"))
        sess = ort.InferenceSession(str(repo / "vision_encoder" / version / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        builder = decoder.prompts(qp.num_visual_tokens)
        self.policy, self.groups = policy, {}
        for r in rows:
            unknown = set(r["labels"]) - set(policy.label_keys)
            if unknown:
                raise SystemExit(f"error: labels {sorted(unknown)} are not in policy {policy.id}")
            pv, _ = qp(decode_image(Path(r["image_path"]).read_bytes()).image)
            vis, ds = sess.run(None, {"PIXEL_VALUES": pv[None]})
            lang = detect_lang(r["caption"])
            req = DecoderRequest(np.array(builder.body_ids(policy, lang, r["caption"])), vis[0], ds[0], policy, lang)
            targets = {"violation": int(r.get("violation", any(r["labels"].values())))}
            targets |= {k: int(r["labels"].get(k, 0)) for k in policy.label_keys}
            reqs, tgts = self.groups.setdefault(lang, ([], []))
            reqs.append(req)
            tgts.append(targets)


def _loss_and_gap(decoder, ex: Examples) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over (yes, no) of every trained question, and mean |P(yes) - label|."""
    losses = []
    for reqs, tgts in ex.groups.values():
        got = decoder.question_logits(reqs)
        logits, qs = got.logits, got.questions
        Q = len(qs)
        rows, opts, target = [], [], []
        for b, t in enumerate(tgts):
            for j, q in enumerate(qs):
                if q.name not in QUESTIONS_SKIPPED:
                    rows.append(b * Q + j)
                    opts.append(q.option_ids)
                    target.append(0 if t[q.name] else 1)  # option 0 = " yes"
        two = logits[torch.tensor(rows)].gather(1, torch.tensor(opts))
        target = torch.tensor(target)
        losses.append((two, target))
    two, target = torch.cat([t for t, _ in losses]), torch.cat([t for _, t in losses])
    # class-balanced: most answers are "no", and a model that only learns the base rate would pull the
    # positives down with the rest
    counts = torch.bincount(target, minlength=2).clamp(min=1).float()
    weight = counts.sum() / (2 * counts)
    loss = torch.nn.functional.cross_entropy(two, target, weight=weight)
    gap = (torch.softmax(two.detach(), -1)[:, 0] - (1 - target).float()).abs()
    return loss, float(gap.mean())


def train(data: Path, out: Path, repo: Path, version: str, policy_name: str, steps: int, lr: float, rank: int,
          seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    from moderation.vlm.decoder import VerdictDecoder

    ckpt = repo / "language_decoder" / version / "checkpoint"
    policy = load_policy(policy_name)
    rows = read_rows(data)
    # the serving code path itself (padded batch, prefix + body prefill, questions on the KV), with gradients;
    # the prefix is recomputed every step because the adapter changes it
    decoder = VerdictDecoder(ckpt, device="cpu", dtype="float32", reuse_prefix=False)
    ex = Examples(rows, repo, version, decoder, policy)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(decoder.model, cfg)  # injects LoRA layers into decoder.model in place
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    with torch.no_grad():
        loss0, gap0 = _loss_and_gap(decoder, ex)
    history = []
    for _step in range(steps):
        loss, gap = _loss_and_gap(decoder, ex)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(round(float(loss.detach()), 5))
    with torch.no_grad():
        loss1, gap1 = _loss_and_gap(decoder, ex)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {
        "name": out.name, "base": f"language_decoder/{version}", "policy": policy.id,
        "data": {"path": str(data), "sha256": file_sha256(data), "rows": len(rows)},
        "lora": {"r": rank, "alpha": 2 * rank, "target_modules": sorted(cfg.target_modules),
                 "trainable_params": trainable},
        "steps": steps, "lr": lr, "seed": seed, "seconds": round(seconds, 2),
        "loss_before": float(loss0), "loss_after": float(loss1), "loss_history": history,
        "mean_abs_score_minus_label_before": gap0, "mean_abs_score_minus_label_after": gap1,
        "base_untrained": (ckpt / "UNTRAINED.json").exists(),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2))
    print(f"LoRA {out.name}: {len(rows)} rows, {steps} steps in {seconds:.1f}s, "
          f"loss {float(loss0):.3f} -> {float(loss1):.3f}, "
          f"mean |score - label| {gap0:.3f} -> {gap1:.3f}")
    return report


def release_adapter(repo: Path, adapter: Path, from_version: str, note: str = "") -> Path:
    """language_decoder/<next>/ = from_version + adapter/, recorded in its artifact.json."""
    from export.release import release
    from moderation.repository.artifacts import read_artifact_record, write_artifact_record

    dst = release(repo, "language_decoder", from_version=from_version, note=note or f"LoRA adapter {adapter.name}")
    if (dst / "adapter").exists():
        shutil.rmtree(dst / "adapter")
    shutil.copytree(adapter, dst / "adapter")
    rec = read_artifact_record(dst, verify=False)
    info = json.loads((adapter / "training.json").read_text())
    extra = {k: v for k, v in rec.items() if k not in ("model", "version", "source", "untrained", "export", "files")}
    extra["adapter"] = {"name": info["name"], "data_sha256": info["data"]["sha256"], "policy": info["policy"],
                        "lora": info["lora"], "base": info["base"]}
    write_artifact_record(dst, source=rec["source"], untrained=rec["untrained"], export=rec.get("export", {}),
                          extra=extra)
    print(json.dumps({"model": "language_decoder", "version": dst.name, "adapter": info["name"]}))
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("export/data/slang_lora.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("build/lora/slang"))
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--base-version", default="1")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--release", type=Path, default=None, metavar="REPOSITORY",
                    help="also release the adapter as the next language_decoder version in REPOSITORY")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train(args.data, args.out, args.repository, args.base_version, args.policy, args.steps, args.lr, args.rank,
          args.seed)
    if args.release:
        release_adapter(args.release, args.out, args.base_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
