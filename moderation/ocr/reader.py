"""The text drawn in an image: PaddleOCR's PP-OCRv4 detection and recognition (and its direction classifier) from
the rapidocr-onnxruntime wheel, through that package's own pre- and post-processing (DB box decoding, crops,
batching, CTC decoding), so the served text is the package's by construction. On the server the three ONNX models
run as Triton models (ocr_detect, ocr_classify, ocr_recognize: dynamic batching, response cache); `infer` is the
call that reaches them (BLS). Without it the package's own onnxruntime sessions run in-process (benchmarks).

Cost control: detection runs at most at `det_side` pixels on the longer side; an image where detection finds no
text costs detection only."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DET_SIDE = 480   # chosen by measurement: docs/performance.md (OCR)
MAX_LINES = 32   # lines kept per image, in reading order
MAX_ASPECT = 8   # wider or taller images are padded to this first (banners keep their text; strips cost nothing)
# Triton model -> (input, output) tensor names: the ONNX files' own, so the onnxruntime backend serves them too.
MODELS = {"ocr_detect": ("x", "sigmoid_0.tmp_0"), "ocr_classify": ("x", "save_infer_model/scale_0.tmp_1"),
          "ocr_recognize": ("x", "softmax_11.tmp_0")}
ONNX_FILES = {"ocr_detect": "ch_PP-OCRv4_det_infer.onnx", "ocr_classify": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "ocr_recognize": "ch_PP-OCRv4_rec_infer.onnx"}


def package_dir() -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent


@dataclass(frozen=True)
class TextLine:
    text: str
    confidence: float
    box: list[list[int]]  # four corners, clockwise from top-left, in the image's pixels

    def to_dict(self) -> dict:
        return {"text": self.text, "confidence": round(self.confidence, 4), "box": self.box}


class ImageTextReader:
    def __init__(self, infer: Callable[[str, np.ndarray], np.ndarray] | None = None, det_side: int = DET_SIDE):
        """`infer(model, input) -> output`: run one of MODELS (None: the package's own sessions)."""
        from rapidocr_onnxruntime import RapidOCR
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

        self.engine = RapidOCR(det_limit_side_len=det_side, det_limit_type="max")
        det = self.engine.text_det
        # rapidocr 1.4 replaces a "max" limit by 960 / 1500 / 2000 px from the image's size (get_preprocess), so
        # without this the limit bounds nothing: detection would run at up to 2000 px
        det.get_preprocess = lambda _longest: DetPreProcess(det_side, "max", det.mean, det.std)
        if infer is not None:
            self.engine.text_det.infer = lambda x: [infer("ocr_detect", x)]
            self.engine.text_cls.infer = lambda x: [infer("ocr_classify", x)]
            self.engine.text_rec.session = lambda x: [infer("ocr_recognize", x)]

    def read(self, image: Image.Image) -> list[TextLine]:
        """Lines in reading order (top to bottom, then left to right), as the package orders them."""
        canvas, (dx, dy) = _within_aspect(image.convert("RGB"))
        result, _ = self.engine(canvas)
        w, h = image.size
        lines = []
        for box, text, score in (result or [])[:MAX_LINES]:
            corners = [[min(w, max(0, int(round(x)) - dx)), min(h, max(0, int(round(y)) - dy))] for x, y in box]
            lines.append(TextLine(str(text), float(score), corners))
        return lines


def _within_aspect(image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
    """The image centred on a white canvas of at most MAX_ASPECT:1 (a 4000x1 strip would otherwise be scaled to a
    30-pixel short side, 120 000 pixels long), and its offset on the canvas."""
    w, h = image.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return image, (0, 0)
    nw, nh = max(w, -(-h // MAX_ASPECT)), max(h, -(-w // MAX_ASPECT))
    canvas = Image.new("RGB", (nw, nh), (255, 255, 255))
    offset = ((nw - w) // 2, (nh - h) // 2)
    canvas.paste(image, offset)
    return canvas, offset
