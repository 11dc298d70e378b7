"""postprocess: RESULT (schema-validated), VERDICT, SCORES and the opt-in EMBEDDING of each post, and its audit
row (core/result.py assembles both)."""
from __future__ import annotations

import json

import numpy as np

from ..core.contracts import GateDecision, RequestRecord
from ..core.result import finish_post
from ..core.result_contract import FailedResult, JudgedResult
from .metrics import Counter
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, rows, string_tensor, tensor


class PostprocessModel(StageModel):
    def initialize(self, args):
        self.stage = Stage(args)
        self.finished = Counter("moderation_requests_total")
        self.actions = Counter("moderation_actions_total")

    def respond(self, request, meta: dict, started: float):
        records = [RequestRecord.from_json(r) for r in bytes_rows(request, "REQUEST")]
        gates = [GateDecision.from_json(g) for g in bytes_rows(request, "GATE")]
        img_emb, txt_emb = rows(request, "IMAGE_EMBEDS"), rows(request, "TEXT_EMBEDS")
        results: list[JudgedResult | FailedResult] = []
        bodies, verdicts, scores, embeds, audit_rows = [], [], [], [], []
        for i, (rec, gate) in enumerate(zip(records, gates, strict=True)):
            meta.update(request_id=rec.request_id, image_sha256=rec.image_sha256, text_sha256=rec.text_sha256,
                        policy=rec.policy_id)
            done = finish_post(rec, gate, self.stage.version)
            audit_rows.append(done.audit_row)
            results.append(done.contract)
            bodies.append(json.dumps(done.result, ensure_ascii=False))
            verdicts.append([done.verdict])
            scores.append(np.asarray(done.scores, np.float32))
            embeds.append(np.concatenate([img_emb[i], txt_emb[i]]) if rec.return_embedding and done.verdict >= 0
                          else np.zeros(0, np.float32))
        # Every post's row, all or none, before any verdict leaves: in fail_closed mode a log that cannot take
        # them raises AuditUnavailable and the whole request is answered [audit_unavailable] (Stage.fail).
        self.stage.audit.write_many(audit_rows)
        for result in results:
            if isinstance(result, FailedResult):
                self.finished.inc(route="error", gate_band="error", violation="error")
                self.actions.inc(action="error", decided_by=result.error.code)
            else:
                self.finished.inc(route=result.route, gate_band=result.gate.band,
                                  violation=str(result.violation).lower())
                self.actions.inc(action=result.action, decided_by=result.decided_by)
        embeds, scores = _pad_rows(embeds), _pad_rows(scores)
        return pb().InferenceResponse([
            string_tensor("RESULT", bodies),
            tensor("VERDICT", np.array(verdicts, dtype=np.int32)),
            tensor("SCORES", np.stack(scores).astype(np.float32)),
            tensor("EMBEDDING", np.stack(embeds).astype(np.float32))])


def _pad_rows(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Rows of one request share a width: a failed post's empty SCORES / EMBEDDING row is zero-padded."""
    width = max(len(r) for r in rows)
    return [np.pad(r, (0, width - len(r))) for r in rows]
