"""What the benchmarks share: a server for a repository (or a copy of one) with the perf policies, posts sent
through the gRPC client (one timed call: moderation/testing/calls.py), a closed-loop load, percentiles and the spread
over runs, posts made unique so no cache can serve them, and a post turned into a decoder request in-process
(vlm_preprocess + vision_encoder, as the vlm ensemble does). Paths, server statistics and the result writer are in
perf/common.py."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moderation.testing.calls import infer as infer
from moderation.testing.calls import options as options
from moderation.testing.results import spread as spread
from moderation.testing.traces import jpeg
from perf.common import perf_policy_dir


# servers ---------------------------------------------------------------------------------------------------
def serve(repository: Path | None, audit: Path, log: Path, key: str = "", policy_dir: Path | None = None,
          env: dict[str, str] | None = None):
    """A running_server (context manager) for `repository` (None: the server's default), reading its policies
    from `policy_dir` (default: perf_policy_dir()) and writing its audit log to `audit`, its log to `log`;
    `env`: more of the servers' environment."""
    from moderation.testing.server import running_server

    env = {"MODERATION_POLICY_DIR": str(policy_dir or perf_policy_dir()), "MODERATION_AUDIT_LOG": str(audit),
           **(env or {})}
    return running_server(repository=repository, env=env, log_path=log, key=key)


# the client ------------------------------------------------------------------------------------------------
def send(client, image: bytes, text: str | bytes, options: dict, timeout_s: float = 120) -> dict:
    """One post to `moderate` as the client library sends it (clients.client.build_inputs): the parsed, validated
    result."""
    import tritonclient.grpc as grpcclient

    from clients.client import build_inputs, parse_response

    inputs, outputs = build_inputs(grpcclient, image, text, options)
    return parse_response(client.infer("moderate", inputs, outputs=outputs, client_timeout=timeout_s))


def load(url: str, jobs: list[tuple[str, bytes, bytes, bytes]], concurrency: int) -> dict:
    """Closed loop: `concurrency` clients each send their next job (infer's arguments after the client) when the
    previous one returns. Throughput over the wall time, p50/p99 and every latency (ms)."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as g

    clients = [g.InferenceServerClient(url) for _ in range(concurrency)]
    chunks = [jobs[i::concurrency] for i in range(concurrency)]

    def worker(i):
        return [infer(clients[i], *job) for job in chunks[i]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        lat = [x for part in ex.map(worker, range(concurrency)) for x in part]
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return {"requests": len(jobs), "concurrency": concurrency, "wall_s": wall, "throughput": len(jobs) / wall,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "latencies_ms": lat}


# statistics ------------------------------------------------------------------------------------------------
def pct(xs, q) -> float:
    """The q-th percentile (numpy's linear interpolation); nan for no values."""
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


# unique posts ----------------------------------------------------------------------------------------------
class UniquePosts:
    """Sample posts made unique per request: a counter stamped into pixels at the centre, re-encoded as
    JPEG (quality 95), and appended to the caption, so image bytes, pixels, tokens and every cache key differ."""

    def __init__(self):
        from moderation.core.imaging import decode_image
        from moderation.testing.samples import sample_posts

        self.posts = sample_posts()
        self.images = [decode_image(p.image_bytes()).image.convert("RGB") for p in self.posts]
        self.n = 0

    def next(self) -> tuple[bytes, bytes]:
        i = self.n
        self.n += 1
        k = i % len(self.posts)
        im = self.images[k].copy()
        px = im.load()
        cx, cy = im.width // 2, im.height // 2  # the centre survives CLIP's and open_nsfw's centre crops
        for j in range(4):
            px[cx + j, cy] = ((i >> (8 * (j % 3))) & 255, (i * 7 + j) & 255, (i * 13) & 255)
        # the caption too: clip_text's response cache must not serve repeated captions in one arm only
        return jpeg(im, 95), f"{self.posts[k].text} #{i}".encode()

    def batch(self, n: int) -> list[tuple[bytes, bytes]]:
        return [self.next() for _ in range(n)]


# in-process decoder inputs ---------------------------------------------------------------------------------
class DecoderInputs:
    """Posts as the language decoder receives them, made in-process from a repository's files: vlm_preprocess
    (VlmInputs) then the vision_encoder ONNX (onnxruntime, CPU; `intra_op_threads` None: onnxruntime's default)."""

    def __init__(self, repo: Path, intra_op_threads: int | None = None):
        import onnxruntime as ort

        from moderation.vlm.inputs import VlmInputs

        self.vlm_inputs = VlmInputs(str(repo / "vlm_preprocess" / "1" / "qwen"), "1")
        opts = ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        self.vision = ort.InferenceSession(str(repo / "vision_encoder" / "1" / "model.onnx"), sess_options=opts,
                                           providers=["CPUExecutionProvider"])

    @property
    def num_visual_tokens(self) -> int:
        return self.vlm_inputs.pixels.num_visual_tokens

    def __call__(self, image: bytes, text: bytes, opts: bytes):
        """(decoder request, vision_encoder milliseconds) for one post."""
        from moderation.core.post import parse_post
        from moderation.vlm.decoder import DecoderRequest

        post = parse_post(image, text, opts)
        pixels, body, info = self.vlm_inputs(post)
        t0 = time.perf_counter()
        vis, ds = self.vision.run(["VISUAL_TOKENS", "DEEPSTACK"], {"PIXEL_VALUES": pixels[None]})
        vision_ms = (time.perf_counter() - t0) * 1e3
        return DecoderRequest(body, vis[0], ds[0], post.policy, info.lang, False), vision_ms
