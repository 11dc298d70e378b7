"""postprocess: turns the gate's decision (and the decoder's answer for escalated posts) into the
structured RESULT (schema-validated), VERDICT, SCORES and the opt-in EMBEDDING, and writes the audit row."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.policy import load_policy
from moderation.result import build_result, validate_result
from moderation.serving.metrics import Counter
from moderation.serving.triton_io import Stage, bytes_rows, rows, string_tensor, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.stage = Stage(args)
        self.finished = Counter("moderation_requests_total")

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        t0, meta = time.perf_counter(), {}
        try:
            records = [json.loads(r) for r in bytes_rows(request, "REQUEST")]
            gates = [json.loads(g) for g in bytes_rows(request, "GATE")]
            img_emb, txt_emb = rows(request, "IMAGE_EMBEDS"), rows(request, "TEXT_EMBEDS")
            results, verdicts, scores, embeds = [], [], [], []
            for i, (rec, gate) in enumerate(zip(records, gates)):
                meta = rec
                policy = load_policy(rec["policy_name"])
                versions = dict(rec["model_versions"], clip_gate=gate["gate_version"], postprocess=self.stage.version)
                latency = dict(rec["latency_ms"])
                latency["clip_encoders"] = max(0.0, (gate["gate_started"] - rec["t_preprocessed"]) * 1e3)
                latency["gate"] = gate["gate_ms"]
                vlm = gate.get("vlm")
                if vlm:
                    versions.update(vlm.get("model_versions", {}))
                    if gate.get("cache", {}).get("hit"):  # a near-duplicate's stored verdict: no VLM ran for this post
                        latency["cache_lookup"] = gate["cache"]["lookup_ms"]
                    else:
                        latency["vlm"] = vlm["roundtrip_ms"]
                        latency.update({f"decoder_{k}": v for k, v in vlm.get("timings_ms", {}).items()})
                latency["total"] = (time.time() - rec["t_received"]) * 1e3
                result = validate_result(build_result(policy, rec, gate, versions, latency))
                results.append(json.dumps(result, ensure_ascii=False))
                verdicts.append([int(result["violation"])])
                scores.append([result["scores"].get(k, 0.0) for k in policy.label_keys])
                embeds.append(np.concatenate([img_emb[i], txt_emb[i]]) if rec.get("return_embedding")
                              else np.zeros(0, np.float32))
                self.stage.audit.write({
                    "request_id": result["request_id"], "stage": "moderate", "route": result["route"],
                    "violation": result["violation"], "labels": result["labels"], "scores": result["scores"],
                    "sentiment": result["sentiment"], "policy": result["policy"],
                    "model_versions": versions, "latency_ms": result["latency_ms"],
                    "image_sha256": rec["image_sha256"], "text_sha256": rec["text_sha256"],
                    "lang": rec["lang"], "error": None, "untrained": result["untrained"],
                    **({"ab": result["ab"]} if "ab" in result else {}),
                    **({"cache": result["cache"]} if "cache" in result else {})})
                self.finished.inc(route=result["route"], violation=str(result["violation"]).lower())
            width = max(len(e) for e in embeds)
            embeds = [np.pad(e, (0, width - len(e))) for e in embeds]
            return pb_utils.InferenceResponse([
                string_tensor("RESULT", results), tensor("VERDICT", np.array(verdicts, dtype=np.int32)),
                tensor("SCORES", np.array(scores, dtype=np.float32)),
                tensor("EMBEDDING", np.stack(embeds).astype(np.float32))])
        except Exception as e:  # noqa: BLE001
            return self.stage.fail(e, meta, t0)
