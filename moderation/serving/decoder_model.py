"""language_decoder (and its INT8 twin language_decoder_int8): Qwen3-VL's language model (transformers) reads
the ONNX vision encoder's tokens and returns violation / label / sentiment probabilities from one prefill; all
requests of a dynamic batch run as one padded batch.

Per model: config parameter `quantization` (none | int8 | int8_dynamic | int8_weight_only, see moderation/vlm/int8.py).
Per version (override): `quantization.json` {"scheme": ...} and a PEFT LoRA adapter directory `adapter/`, both
covered by the version's artifact.json like every other file."""
import json

import torch

from ..core.contracts import DecoderOptions
from ..core.policy import load_policy
from ..repository.artifacts import read_artifact_record
from ..vlm.decoder import DecoderRequest, VerdictDecoder
from .metrics import Counter
from .pb import pb
from .triton_io import Stage, bytes_rows, parameters, rows, string_tensor, version_dir


class DecoderModel:
    def initialize(self, args):
        self.stage = Stage(args)
        self.batch_size = Counter("moderation_decoder_batch_size")
        params = parameters(args)
        torch.set_num_threads(int(params.get("torch_threads", "2")))
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        quantization = params.get("quantization", "none")
        if (vdir / "quantization.json").exists():
            quantization = json.loads((vdir / "quantization.json").read_text(encoding="utf-8"))["scheme"]
        adapter = vdir / "adapter" if (vdir / "adapter" / "adapter_config.json").exists() else None
        self.decoder = VerdictDecoder(vdir / "checkpoint", device=params.get("device", "auto"),
                                      dtype=params.get("dtype", "auto"), quantization=quantization, adapter=adapter)
        # model_versions keys: this model's name (language_decoder or language_decoder_int8) -> version, plus how
        # it runs ("cpu:float32+int8_dynamic") and the adapter it merged, if any
        self.versions = {self.stage.name: self.stage.version, f"{self.stage.name}_device": self.decoder.device_label}
        if self.decoder.adapter:
            name = self.record.get("adapter", {}).get("name", self.decoder.adapter)
            self.versions[f"{self.stage.name}_adapter"] = name
        self.stage.logger.log_info(f"{self.stage.name} v{self.stage.version} on {self.decoder.device_label}, "
                                   f"adapter={self.decoder.adapter}, untrained={self.decoder.untrained}")

    def execute(self, requests):
        items, owners, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                vis, ds = rows(request, "VISUAL_TOKENS"), rows(request, "DEEPSTACK")
                body = rows(request, "BODY_IDS")
                opts = [DecoderOptions.from_json(o) for o in bytes_rows(request, "DECODER_OPTIONS")]
                batch = []
                for j, o in enumerate(opts):
                    ids = body[j][body[j] >= 0]  # rows of one request are padded with -1
                    batch.append((o, DecoderRequest(ids, vis[j], ds[j], load_policy(o.policy_name), o.lang,
                                                    o.describe)))
                items += batch
                owners.append((i, len(batch)))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the batch
                responses[i] = self.stage.fail(e)
        if not items:
            return responses
        self.batch_size.set(len(items), version=self.stage.version, model=self.stage.name)
        try:
            results = self.decoder.score([d for _, d in items])
        except Exception as e:  # noqa: BLE001 - a failed batch fails each of its requests with a coded error
            for i, _ in owners:
                responses[i] = self.stage.fail(e)
            return responses
        k = 0
        for i, n in owners:
            out = [res.verdict(untrained=self.decoder.untrained, caption_truncated=opts.caption_truncated,
                               model_versions={"vlm_preprocess": opts.vlm_preprocess_version, **self.versions})
                   .to_json() for (opts, _), res in zip(items[k:k + n], results[k:k + n], strict=True)]
            responses[i] = pb().InferenceResponse([string_tensor("VLM_RESULT", out)])
            k += n
        return responses
