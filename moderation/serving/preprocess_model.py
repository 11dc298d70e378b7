"""preprocess: validate and decode each post (safe image decode, caption checks, options, policy), then CLIP
pixels, CLIP tokens, open_nsfw pixels and the post's RequestRecord (read_text adds the image's text). Bad input
fails that request only, with a coded error and its audit row."""
from __future__ import annotations

import time

import numpy as np

from ..core.errors import BadRequest
from ..gate.inputs import GateInputs, Preprocess, check_rows, first_post_meta
from ..repository.artifacts import read_artifact_record
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, image_rows, infer_blocking, string_tensor, tensor, version_dir


class PreprocessModel(StageModel):
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        read_artifact_record(vdir)  # refuses to load when a file differs from its record
        self.preprocess = Preprocess(str(vdir / "clip"), self.stage.version, score_nsfw=_nsfw_bls,
                                     embed_image=_clip_bls)

    def respond(self, request, meta: dict, t0: float):
        received = time.time()
        # IMAGE and TEXT are optional in the config so that a request lacking one is answered (and audited)
        # here with a coded error, under its request_id, rather than refused unaudited by Triton.
        images, texts = image_rows(request, "IMAGE", optional=True), bytes_rows(request, "TEXT", optional=True)
        options = bytes_rows(request, "OPTIONS", optional=True)
        try:
            option_rows = check_rows(images, texts, options)
        except BadRequest:
            meta.update(first_post_meta(images, texts, options))  # the audit row of a request refused whole
            raise
        posts = self._posts(images, texts, option_rows, received, t0, meta)
        return pb().InferenceResponse([
            tensor("CLIP_PIXELS", np.stack([p.clip_pixels for p in posts])),
            tensor("CLIP_INPUT_IDS", np.stack([p.clip_input_ids for p in posts])),
            tensor("CLIP_ATTENTION_MASK", np.stack([p.clip_attention_mask for p in posts])),
            string_tensor("REQUEST", [p.record.to_json() for p in posts]),
            tensor("NSFW_PIXELS", np.stack([p.nsfw_pixels for p in posts])),
            string_tensor("FRAMES", [p.frames for p in posts])])

    def _posts(self, images, texts, option_rows, received, t0, meta: dict):
        """One GateInputs per post. A request of one post fails with its post (raises); in a request of several,
        a bad post becomes a row with its error and the others are judged (postprocess writes each row)."""
        if len(images) == 1:
            return [self.preprocess(images[0], texts[0], option_rows[0], received, t0, meta)]
        posts: list[GateInputs | None] = []
        failed = []
        for image, text, opt in zip(images, texts, option_rows, strict=True):
            post_meta: dict = {}
            try:
                posts.append(self.preprocess(image, text, opt, received, t0, post_meta))
            except Exception as e:  # noqa: BLE001 - a bad post costs only its own row
                posts.append(None)
                failed.append((len(posts) - 1, e, post_meta))
        like = next((p for p in posts if p is not None), None)
        for i, err, post_meta in failed:
            posts[i] = self.preprocess.failed(err, post_meta, received, t0, like)
        return posts


# nsfw_image's tensors (the ONNX file's own names) and its max_batch_size; clip_image's
NSFW_INPUT, NSFW_OUTPUT, NSFW_BATCH = "input:0", "outputs", 16
CLIP_INPUT, CLIP_OUTPUT, CLIP_BATCH = "pixel_values", "IMAGE_EMBEDS", 16


def _nsfw_bls(pixels: np.ndarray) -> np.ndarray:
    """open_nsfw's P(nsfw) per row of NHWC pixels, by BLS to nsfw_image (every image and frame of a post after its
    first), at most its max_batch_size rows a call."""
    return np.concatenate([infer_blocking("nsfw_image", NSFW_INPUT, pixels[start:start + NSFW_BATCH], NSFW_OUTPUT)[:, 1]
                           for start in range(0, len(pixels), NSFW_BATCH)])


def _clip_bls(pixels: np.ndarray) -> np.ndarray:
    """clip_image's embedding per row of ClipPixels of one shape, by BLS (the images and frames of a post after its
    first), at most its max_batch_size rows a call."""
    return np.concatenate([infer_blocking("clip_image", CLIP_INPUT, pixels[start:start + CLIP_BATCH], CLIP_OUTPUT)
                           for start in range(0, len(pixels), CLIP_BATCH)])
