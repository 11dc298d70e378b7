"""The text drawn in an image: PaddleOCR's PP-OCRv4 detection and recognition (and its direction classifier) from
the rapidocr-onnxruntime wheel, through that package's own pre- and post-processing (DB box decoding, crops,
batching, CTC decoding), so the served text is the package's by construction. On the server the three ONNX models
run as Triton models (ocr_detect, ocr_classify, ocr_recognize: dynamic batching, response cache); `infer` is the
call that reaches them (BLS). Without it the package's own onnxruntime sessions run in-process (benchmarks).

Cost control: detection runs at most at `det_side` pixels on the longer side; an image where detection finds no
text costs detection only; recognition reads the detected boxes largest first within a per-image ReadBudget (boxes,
area, time), and a read cut short by it says so (ImageText.truncated): dense text costs a bounded read, not one
recognition per word."""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

K = TypeVar("K", bound=Hashable)  # what a caller keys its frames by (read_frames)

DET_SIDE = 480   # chosen by measurement: docs/performance.md (OCR)
MAX_LINES = 32   # lines kept per image, in reading order
REC_HEIGHT = 48  # PP-OCRv4 recognition reads each box scaled to this height
REC_CHUNK = 6    # boxes per recognition batch (the package's rec_batch_num), and between looks at the time budget
REC_MIN_RATIO = 320 / 48  # the package's narrowest recognition input, in line squares
MAX_ASPECT = 8   # wider or taller images are padded to this first (banners keep their text; strips cost nothing)
BAND_GUTTER = 16  # white rows between changed bands stacked into one picture for one read (read_frames)
Bands = tuple[tuple[int, int], ...]  # rows [top, bottom) of a frame to read
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


@dataclass(frozen=True)
class ReadBudget:
    """What recognition may spend on one image (policy ocr): at most `max_boxes` detected boxes, at most
    `max_area` line squares of them (rec_area: the recogniser's cost follows each box's long side / short side),
    and no new batch of boxes once `max_ms` have passed since the read began. Detection always runs whole."""
    max_boxes: int = 48
    max_area: float = 48.0  # the shipped memes' two lines cost 13-31 squares
    max_ms: float = 400.0

    @classmethod
    def of(cls, settings) -> ReadBudget:
        """The budget a policy's `ocr` section (core.policy.OcrSettings) sets."""
        return cls(max_boxes=settings.max_boxes, max_area=settings.max_read_area, max_ms=settings.max_read_ms)


@dataclass(frozen=True)
class ImageText:
    lines: list[TextLine]   # reading order, at most MAX_LINES
    truncated: bool         # boxes were detected that the budget left unread
    boxes_found: int
    boxes_read: int


def rec_area(box: np.ndarray) -> float:
    """A detected box's cost to the recogniser in line squares: the recogniser reads it scaled to a REC_HEIGHT-px
    line, so REC_HEIGHT x REC_HEIGHT squares, as many as its long side / short side (crops taller than wide are
    turned on their side first, as the package does)."""
    w = max(float(np.linalg.norm(box[0] - box[1])), float(np.linalg.norm(box[2] - box[3])))
    h = max(float(np.linalg.norm(box[0] - box[3])), float(np.linalg.norm(box[1] - box[2])))
    return float(max(w, h) / max(1.0, min(w, h)))


def rec_cost(areas: list[float]) -> float:
    """Line squares the recogniser computes for boxes read in this order, REC_CHUNK per batch: the package pads
    every box of a batch to the batch's widest (and at least REC_MIN_RATIO squares)."""
    return sum(len(part) * max(REC_MIN_RATIO, *part) for part in
               (areas[i:i + REC_CHUNK] for i in range(0, len(areas), REC_CHUNK)))


def within_budget(boxes: list[np.ndarray], budget: ReadBudget) -> list[int]:
    """Indexes of the boxes to read, in the order they are read: the largest (by image area) first while the box
    and area budgets last (a box that would pass the area budget is skipped, a later one may still fit). Large text
    is what a viewer reads first."""
    order = sorted(range(len(boxes)), key=lambda i: -_image_area(boxes[i]))
    chosen: list[int] = []
    areas: list[float] = []
    for i in order:
        if len(chosen) == budget.max_boxes:
            break
        area = rec_area(boxes[i])
        if rec_cost(areas + [area]) <= budget.max_area:
            chosen.append(i)
            areas.append(area)
    return chosen


def _image_area(box: np.ndarray) -> float:
    x, y = box[:, 0], box[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


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

    def read(self, image: Image.Image, budget: ReadBudget = ReadBudget()) -> list[TextLine]:
        """Lines in reading order (top to bottom, then left to right), as the package orders them."""
        return self.read_within(image, budget).lines

    def read_within(self, image: Image.Image, budget: ReadBudget = ReadBudget()) -> ImageText:
        """The image's lines read within `budget`, and whether it left detected text unread. The steps of the
        package's RapidOCR.__call__, with the budget between detection and recognition."""
        t0 = time.perf_counter()
        engine = self.engine
        canvas, (dx, dy) = _within_aspect(image.convert("RGB"))
        img = engine.load_img(canvas)
        raw_h, raw_w = img.shape[:2]
        img, ratio_h, ratio_w = engine.preprocess(img)
        op_record = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        img, op_record = engine.maybe_add_letterbox(img, op_record)
        boxes, _ = engine.auto_text_det(img)
        if not boxes:
            return ImageText([], False, 0, 0)
        chosen = within_budget(boxes, budget)
        read: list[int] = []
        rec_res: list = []
        for start in range(0, len(chosen), REC_CHUNK):
            if read and (time.perf_counter() - t0) * 1e3 > budget.max_ms:
                break
            part = chosen[start:start + REC_CHUNK]
            crops = engine.get_crop_img_list(img, [boxes[i] for i in part])
            crops, _, _ = engine.text_cls(crops)
            got, _ = engine.text_rec(crops, False)
            read += part
            rec_res += list(got)
        order = sorted(range(len(read)), key=lambda k: read[k])  # back to reading order
        kept = [boxes[read[k]] for k in order]
        origin = engine._get_origin_points(kept, op_record, raw_h, raw_w)
        result, _ = engine.get_final_res(list(origin), None, [rec_res[k] for k in order], 0.0, 0.0, 0.0)
        w, h = image.size
        lines = []
        for box, text, score in (result or [])[:MAX_LINES]:
            corners = [[min(w, max(0, int(round(x)) - dx)), min(h, max(0, int(round(y)) - dy))] for x, y in box]
            lines.append(TextLine(str(text), float(score), corners))
        return ImageText(lines, len(read) < len(boxes), len(boxes), len(read))

    def read_frames(self, frames: list[tuple[K, Image.Image, Bands | None]],
                    budget: ReadBudget = ReadBudget()) -> tuple[list[tuple[K, ImageText]], bool]:
        """Each (key, frame, bands) of a post's images read within `budget` per frame: a frame whole when `bands` is
        None (an image, an animation's first frame), else only those rows (core/imaging.py read_bands: where it
        differs from an earlier frame whose text was read; a frame that changed in most of its rows is read whole).
        The changed rows of several frames of one size are stacked into one picture and read at once (one detection
        for the animation, not one per frame), with the budget of as many frames. A post costs at most its judged
        images and frames (policy media) x one image's read. Returns (key, its text) per frame, and whether the budget
        left detected text unread in any of them."""
        reads: dict[int, ImageText] = {}
        banded: list[tuple[int, Image.Image, Bands]] = []
        for n, (_, image, bands) in enumerate(frames):
            if bands is None or sum(b - t for t, b in bands) * 2 >= image.height:
                reads[n] = self.read_within(image, budget)
            elif not bands:
                reads[n] = ImageText([], False, 0, 0)
            else:
                banded.append((n, image, bands))
        for sheet in _sheets(banded):
            reads.update(self._read_sheet(sheet, budget))
        out = [(key, reads[n]) for n, (key, _, _) in enumerate(frames)]
        return out, any(read.truncated for _, read in out)

    def _read_sheet(self, sheet: list[tuple[int, Image.Image, Bands]], budget: ReadBudget) -> dict[int, ImageText]:
        """One read of the stacked bands of `sheet`'s frames, each line given back to its frame in its pixels."""
        w = sheet[0][1].width
        slots, y = [], 0  # (top on the sheet, frame number, top in the frame, bottom in the frame)
        for n, _, bands in sheet:
            for top, bottom in bands:
                slots.append((y, n, top, bottom))
                y += bottom - top + BAND_GUTTER
        canvas = Image.new("RGB", (w, y - BAND_GUTTER), (255, 255, 255))
        images = {n: image for n, image, _ in sheet}
        for at, n, top, bottom in slots:
            canvas.paste(images[n].crop((0, top, w, bottom)), (0, at))
        k = len(sheet)
        read = self.read_within(canvas, ReadBudget(budget.max_boxes * k, budget.max_area * k, budget.max_ms * k))
        lines: dict[int, list[TextLine]] = {n: [] for n in images}
        for line in read.lines:
            centre = sum(p[1] for p in line.box) / len(line.box)
            at, n, top, bottom = next((s for s in slots if s[0] <= centre < s[0] + s[3] - s[2]), slots[-1])
            h = images[n].height
            lines[n].append(TextLine(line.text, line.confidence,
                                     [[x, min(h, max(0, py - at + top))] for x, py in line.box]))
        return {n: ImageText(found, read.truncated, read.boxes_found, read.boxes_read) for n, found in lines.items()}


def _sheets(banded: list[tuple[int, Image.Image, Bands]]) -> list[list[tuple[int, Image.Image, Bands]]]:
    """Frames' bands grouped into sheets of one width, each at most as tall as its frames' longer side (detection
    scales a sheet as it would scale one frame, so text keeps its size)."""
    sheets: list[list[tuple[int, Image.Image, Bands]]] = []
    height = 0
    for item in banded:
        _, image, bands = item
        rows = sum(b - t + BAND_GUTTER for t, b in bands)
        current = sheets[-1] if sheets else None
        if current and current[0][1].width == image.width and height + rows <= max(image.size) + BAND_GUTTER:
            current.append(item)
            height += rows
        else:
            sheets.append([item])
            height = rows
    return sheets


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
