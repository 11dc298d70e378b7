"""read_text: the text drawn in each post's image (PP-OCRv4 through ocr_detect / ocr_classify / ocr_recognize by
BLS) and what depends on it, written into the post's RequestRecord (gate/inputs.py ReadImageText). An ensemble step
beside the encoders. A post whose image cannot be read fails alone in a request of several posts."""
from __future__ import annotations

import numpy as np

from ..core.contracts import PostError, RequestRecord
from ..core.errors import ModerationError
from ..gate.inputs import ReadImageText
from ..ocr.reader import MODELS as OCR_MODELS
from ..ocr.reader import ImageTextReader
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, infer_blocking, string_tensor


class ReadTextModel(StageModel):
    def initialize(self, args):
        self.stage = Stage(args)
        self.read = ReadImageText(ImageTextReader(_ocr_bls), self.stage.version)

    def respond(self, request, meta: dict, started: float):
        records = [RequestRecord.from_json(r) for r in bytes_rows(request, "REQUEST")]
        posts = list(zip(bytes_rows(request, "FRAMES"), bytes_rows(request, "TEXT"), records, strict=True))
        if len(posts) == 1:  # a request of one post fails with its post, as in preprocess
            meta.update(_meta(records[0]))
            out = [self.read(*posts[0])]
        else:
            out = [self._post(*post) for post in posts]
        return pb().InferenceResponse([string_tensor("REQUEST", [r.to_json() for r in out])])

    def _post(self, frames: bytes, text: bytes, record: RequestRecord) -> RequestRecord:
        try:
            return self.read(frames, text, record)
        except Exception as e:  # noqa: BLE001 - a post whose text cannot be read costs only its own row
            if not isinstance(e, ModerationError):
                self.stage.logger.log_error(f"read_text: {type(e).__name__} on one post of a request")
            return record.model_copy(update={"error": PostError.of(e)})


def _meta(record: RequestRecord) -> dict:
    return {"request_id": record.request_id, "image_sha256": record.image_sha256, "text_sha256": record.text_sha256,
            "policy": record.policy_id}


def _ocr_bls(model: str, x: np.ndarray) -> np.ndarray:
    """One OCR model call by BLS (the reader runs inside this model's own execute)."""
    name_in, name_out = OCR_MODELS[model]
    return infer_blocking(model, name_in, x, name_out)
