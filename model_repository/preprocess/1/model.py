"""preprocess: validate and decode each post (safe image decode, caption checks, options, policy),
then CLIP pixels, CLIP tokens, content hashes. Bad input fails that request only, with a coded error."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.artifacts import read_artifact_record
from moderation.errors import BadRequest, ModerationError
from moderation.imaging import NsfwPixels
from moderation.options import parse_options
from moderation.pipeline import ClipInputs, hashes_of, parse_post
from moderation.serving.triton_io import Stage, bytes_rows, string_tensor, tensor, version_dir


class TritonPythonModel:
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        self.clip = ClipInputs(str(vdir / "clip"))
        self.nsfw = NsfwPixels()  # open_nsfw's reference preprocessing for the nsfw_image model

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        t0, wall0, meta = time.perf_counter(), time.time(), {}
        try:
            # IMAGE and TEXT are optional in the config so that a request lacking one is answered (and audited)
            # here with a coded error, under its request_id, rather than refused unaudited by Triton.
            images, texts = bytes_rows(request, "IMAGE", optional=True), bytes_rows(request, "TEXT", optional=True)
            options = bytes_rows(request, "OPTIONS", optional=True)
            option_rows = options or [None] * len(images)
            missing = [name for name, got in (("IMAGE", images), ("TEXT", texts)) if not got]
            if missing or not (len(images) == len(texts) == len(option_rows)):
                meta = _first_post_meta(images, texts, options)  # the audit row of a request refused whole
                if missing:
                    raise BadRequest(f"missing required input {missing[0]}: send IMAGE (encoded image bytes) and "
                                     "TEXT (UTF-8 caption, empty for none) as BYTES tensors of shape [batch, 1]")
                raise BadRequest(f"IMAGE, TEXT and OPTIONS have {len(images)}, {len(texts)} and "
                                 f"{len(option_rows)} rows; send one of each per post")
            pixels, ids, masks, records, nsfw = [], [], [], [], []
            for image, text, opt in zip(images, texts, option_rows):
                hashes = hashes_of(image, text)
                meta = dict(hashes)  # a failing post's audit row: hashes, and its request_id once read
                parsed = parse_options(opt)
                meta["request_id"] = parsed.request_id
                post = parse_post(image, text, parsed, hashes)
                p, i, m = self.clip(post)
                pixels.append(p), ids.append(i), masks.append(m)
                nsfw.append(self.nsfw(post.image))
                rec = post.request_record()
                rec.update(t_received=wall0, t_preprocessed=time.time(),
                           latency_ms={"preprocess": (time.perf_counter() - t0) * 1e3},
                           model_versions={"preprocess": self.stage.version},
                           clip_untrained=bool(self.record.get("untrained")))
                records.append(json.dumps(rec, ensure_ascii=False))
            return pb_utils.InferenceResponse([
                tensor("CLIP_PIXELS", np.stack(pixels)), tensor("CLIP_INPUT_IDS", np.stack(ids)),
                tensor("CLIP_ATTENTION_MASK", np.stack(masks)), string_tensor("REQUEST", records),
                tensor("NSFW_PIXELS", np.stack(nsfw))])
        except Exception as e:  # noqa: BLE001 - every failure becomes a coded error for this request only
            return self.stage.fail(e, meta, t0)


def _first_post_meta(images, texts, options) -> dict:
    meta = hashes_of(images[0] if images else None, texts[0] if texts else None)
    try:
        meta["request_id"] = parse_options(options[0]).request_id if options else None
    except ModerationError:
        pass
    return meta
