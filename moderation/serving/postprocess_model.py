"""postprocess: RESULT (schema-validated), VERDICT, SCORES and the opt-in EMBEDDING of each post, and its audit
row (core/result.py assembles both)."""
from __future__ import annotations

import json
import time

import numpy as np

from ..core.contracts import GateDecision, RequestRecord
from ..core.result import finish_post
from .metrics import Counter
from .pb import pb
from .triton_io import Stage, bytes_rows, rows, string_tensor, tensor


class PostprocessModel:
    def initialize(self, args):
        self.stage = Stage(args)
        self.finished = Counter("moderation_requests_total")

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        t0, meta = time.perf_counter(), {}
        try:
            records = [RequestRecord.from_json(r) for r in bytes_rows(request, "REQUEST")]
            gates = [GateDecision.from_json(g) for g in bytes_rows(request, "GATE")]
            img_emb, txt_emb = rows(request, "IMAGE_EMBEDS"), rows(request, "TEXT_EMBEDS")
            results, verdicts, scores, embeds = [], [], [], []
            for i, (rec, gate) in enumerate(zip(records, gates, strict=True)):
                meta = {"request_id": rec.request_id, "image_sha256": rec.image_sha256,
                        "text_sha256": rec.text_sha256, "policy": rec.policy_id}
                done = finish_post(rec, gate, self.stage.version)
                self.stage.audit.write(done.audit_row)
                results.append(done.result)
                verdicts.append([int(done.result["violation"])])
                scores.append(done.scores)
                embeds.append(np.concatenate([img_emb[i], txt_emb[i]]) if rec.return_embedding
                              else np.zeros(0, np.float32))
                self.finished.inc(route=done.result["route"], violation=str(done.result["violation"]).lower())
            width = max(len(e) for e in embeds)
            embeds = [np.pad(e, (0, width - len(e))) for e in embeds]
            return pb().InferenceResponse([
                string_tensor("RESULT", [json.dumps(r, ensure_ascii=False) for r in results]),
                tensor("VERDICT", np.array(verdicts, dtype=np.int32)),
                tensor("SCORES", np.array(scores, dtype=np.float32)),
                tensor("EMBEDDING", np.stack(embeds).astype(np.float32))])
        except Exception as e:  # noqa: BLE001 - every failure becomes a coded error for this request only
            return self.stage.fail(e, meta, t0)
