"""The OpenAI-compatible /v1/moderations front end (moderation/openai/) on a real server, called with the official
`openai` client: a post as text + image parts, text-only inputs, several inputs, OpenAI's error shape, every call
audited through the gateway, and no server-side fetch of a URL a caller names unless its host is allow-listed."""
from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.request

import openai
import pytest

from moderation.core.audit import read_rows
from moderation.core.policy import OPENAI_CATEGORIES
from moderation.testing.samples import sample_posts
from moderation.testing.server import running_server

from .conftest import REPO

POST = sample_posts()[0]


class _ImageHost(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        _ImageHost.hits.append(self.path)
        body = POST.image_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def front(tmp_path_factory, policy_dir, image_host):
    root = tmp_path_factory.mktemp("openai")
    env = {"MODERATION_POLICY_DIR": str(policy_dir), "MODERATION_AUDIT_LOG": str(root / "audit.jsonl"),
           "MODERATION_OPENAI_IMAGE_HOSTS": "localhost"}  # 127.0.0.1 (same server) stays refused
    with running_server(repository=REPO, env=env, log_path=root / "triton.log", openai=True) as srv:
        srv.audit = root / "audit.jsonl"
        srv.client = openai.OpenAI(base_url=srv.openai_url, api_key="not-used", max_retries=0, timeout=120)
        yield srv


def _data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _post_parts(url: str | None = None):
    return [{"type": "text", "text": POST.text},
            {"type": "image_url", "image_url": {"url": url or _data_url(POST.image_bytes())}}]


def _ext(result) -> dict:
    return result.model_extra["moderation"] if result.model_extra else result.to_dict()["moderation"]


def test_a_post_as_text_and_image_parts_is_moderated_and_audited(front):
    r = front.client.moderations.create(model="omni-moderation-latest", input=_post_parts())
    assert r.id.startswith("modr-") and r.model == "omni-moderation-latest" and len(r.results) == 1
    res = r.results[0].to_dict()
    assert set(res["categories"]) == set(res["category_scores"]) == set(OPENAI_CATEGORIES)
    ext = res["moderation"]
    assert ext["action"] in ("allow", "review", "block") and res["flagged"] == (ext["action"] != "allow")
    assert ext["untrained"] is True and ext["request_id"] == r.id
    assert ext["route"] in ("gate", "list", "vlm", "cache") and ext["gate_band"] in ("allow", "block", "escalate")
    assert res["category_applied_input_types"]["violence"] == ["image", "text"]
    assert res["category_applied_input_types"]["sexual/minors"] == []  # unmapped in the default policy
    assert "sexual/minors" in ext["unmapped_categories"]
    rows = [row for row in read_rows(front.audit) if row.get("request_id") == r.id]
    assert [row["stage"] for row in rows] == ["moderate"] and rows[0]["image_sha256"]


def test_text_only_inputs_are_judged_by_text_signals_alone(front):
    r = front.client.moderations.create(input="you fucking idiot")
    res = r.results[0].to_dict()
    assert res["category_applied_input_types"]["harassment"] == ["text"]
    row = next(row for row in read_rows(front.audit) if row.get("request_id") == r.id)
    assert row["image_format"] == "none" and "nsfw_image" not in {e[0] for e in row["evidence"]}
    several = front.client.moderations.create(input=["a nice day at the beach", "you fucking idiot"])
    assert len(several.results) == 2
    assert [x.to_dict()["moderation"]["request_id"] for x in several.results] == [f"{several.id}-0",
                                                                                   f"{several.id}-1"]


def test_remote_image_urls_are_not_fetched_unless_their_host_is_allowed(front, image_host):
    _ImageHost.hits.clear()
    with pytest.raises(openai.BadRequestError) as e:
        front.client.moderations.create(input=_post_parts(f"http://127.0.0.1:{image_host}/meme.jpg"))
    assert e.value.body["code"] == "image_url_not_allowed" and _ImageHost.hits == []
    for url in ("http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError):
            front.client.moderations.create(input=_post_parts(url))
    assert _ImageHost.hits == []
    r = front.client.moderations.create(input=_post_parts(f"http://localhost:{image_host}/meme.jpg"))
    assert _ImageHost.hits == ["/meme.jpg"] and r.results[0].to_dict()["moderation"]["action"]


def test_errors_come_in_openais_shape(front):
    with pytest.raises(openai.BadRequestError) as e:
        front.client.moderations.create(input=_post_parts(_data_url(b"not an image")))
    assert e.value.body["code"] == "bad_image" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        front.client.moderations.create(model="no-such-model", input="hi")
    assert e.value.body["code"] == "model_not_found"
    req = urllib.request.Request(front.openai_url + "/moderations", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req, timeout=30)
    assert h.value.code == 400 and json.loads(h.value.read())["error"]["code"] == "invalid_json"
    # a request of several inputs: one bad input costs only its own result
    several = front.client.moderations.create(input=["fine", "x" * 20_000])
    bad = several.results[1].to_dict()
    assert bad["flagged"] and bad["moderation"]["error"]["code"] == "text_too_long"
    assert several.results[0].to_dict()["moderation"]["action"]


def test_text_only_posts_carry_no_image(triton):
    import tritonclient.grpc as grpcclient

    from clients.client import build_inputs
    from moderation.core.errors import classify_failure

    inputs, outputs = build_inputs(grpcclient, POST.image_bytes(), "hi", {"text_only": True})
    with pytest.raises(Exception) as e:
        grpcclient.InferenceServerClient(triton.grpc_url).infer("moderate", inputs, outputs=outputs,
                                                                client_timeout=60)
    assert classify_failure(e.value.message(), e.value.status())[0] == "bad_request"


def test_several_image_parts_are_one_post_and_evidence_names_the_image(front, policy_dir):
    from moderation.core.policy import PolicyLists, TermEntry

    from .test_frames import _policy_with_lists
    from .test_multi_image import TERM, _jpeg

    terms = PolicyLists(revision=1, terms=[TermEntry(id="term-wzbp", list="block", label="scam", term=TERM)])
    _policy_with_lists(policy_dir, "openai_multi_terms", terms)
    images = [_jpeg("astronaut"), _jpeg("coffee"), _jpeg("chelsea", f"{TERM} 加我")]
    parts = [{"type": "text", "text": "周末愉快"}] + [
        {"type": "image_url", "image_url": {"url": _data_url(x)}} for x in images]
    r = front.client.moderations.create(model="openai_multi_terms", input=parts)  # the model names the policy
    assert len(r.results) == 1
    ext = _ext(r.results[0])
    assert r.results[0].flagged and ext["action"] == "block" and ext["decided_by"] == "terms"
    assert [h["image"] for h in ext["list_hits"] if h["id"] == "term-wzbp"] == [2]
    assert len(ext["media"]["images"]) == 3
