"""language_decoder (and its INT8 twin language_decoder_int8): Qwen3-VL's language model (transformers) reads
the ONNX vision encoder's tokens and returns violation / label / sentiment probabilities from one prefill; all
requests of a dynamic batch run as one padded batch.

Per model: config parameter `quantization` (none | int8 | int8_dynamic | int8_weight_only, see moderation/vlm/int8.py).
Per version (override): `quantization.json` {"scheme": ...} and a PEFT LoRA adapter directory `adapter/`, both
covered by the version's artifact.json like every other file."""
import json

import numpy as np
import torch

from ..core.contracts import DecoderOptions
from ..core.errors import BadRequest
from ..core.pinned import pinned_policy
from ..core.policy import load_policy, policy_dir
from ..repository.artifacts import read_artifact_record
from ..vlm.decoder import DecoderRequest, VerdictDecoder
from .metrics import Counter
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, parameters, rows, string_tensor, version_dir


class DecoderModel(StageModel):
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
        self._check_policies()

    def _check_policies(self) -> None:
        """Every policy's answer options are one token of this decoder's vocabulary: the default policy's must be
        (the model refuses to load), another one's failure is logged and its escalated posts fail bad_policy."""
        prompts = self.decoder.prompts(0)
        for path in sorted(policy_dir().glob("*.yaml")):
            try:
                prompts.check(load_policy(path.stem))
            except Exception as e:  # one unusable policy must not stop the others' posts
                if path.stem == "default":
                    raise
                self.stage.logger.log_error(f"{self.stage.name}: policy {path.stem} is unusable: {e}")

    def _request(self, body: np.ndarray, vis: np.ndarray, ds: np.ndarray, opts: DecoderOptions) -> DecoderRequest:
        """One post's decoder input, checked: the body holds one image token per visual token and only ids of
        the vocabulary (a post that breaks either fails alone with bad_request, never its batch)."""
        ids = body[body >= 0]  # rows of one request are padded with -1
        image_tokens = int((ids == self.decoder.config.image_token_id).sum())
        if image_tokens != len(vis):
            raise BadRequest(f"the prompt body holds {image_tokens} image tokens for {len(vis)} visual tokens")
        if ids.size and int(ids.max()) >= self.decoder.config.text_config.vocab_size:
            raise BadRequest("the prompt body holds a token id outside the decoder's vocabulary")
        return DecoderRequest(ids, vis, ds, pinned_policy(opts.policy_name, opts.policy_pin), opts.lang, opts.describe)

    def execute(self, requests):
        items, owners, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                vis, ds = rows(request, "VISUAL_TOKENS"), rows(request, "DEEPSTACK")
                body = rows(request, "BODY_IDS")
                opts = [DecoderOptions.from_json(o) for o in bytes_rows(request, "DECODER_OPTIONS")]
                batch = [(o, self._request(body[j], vis[j], ds[j], o)) for j, o in enumerate(opts)]
                items += batch
                owners.append((i, len(batch)))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the batch
                responses[i] = self.stage.fail(e)
        if not items:
            return responses
        self.batch_size.set(len(items), version=self.stage.version, model=self.stage.name)
        try:
            results = self.decoder.score([d for _, d in items])
        except Exception:  # noqa: BLE001 - a failed batch is scored again request by request: only the bad one fails
            results = None
        k = 0
        for i, n in owners:
            mine = items[k:k + n]
            k += n
            try:
                scored = results[k - n:k] if results is not None else self.decoder.score([d for _, d in mine])
            except Exception as e:  # noqa: BLE001 - this request alone fails, with a coded error
                responses[i] = self.stage.fail(e)
                continue
            out = [res.verdict(untrained=self.decoder.untrained, caption_truncated=opts.caption_truncated,
                               model_versions={"vlm_preprocess": opts.vlm_preprocess_version, **self.versions})
                   .to_json() for (opts, _), res in zip(mine, scored, strict=True)]
            responses[i] = pb().InferenceResponse([string_tensor("VLM_RESULT", out)])
        return responses
